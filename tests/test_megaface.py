"""MegaFace: chunked evaluation equals a brute-force full-matrix computation on clustered features,
for arrays, block lists and memmaps, raw and refined; input errors."""

from __future__ import annotations

import numpy as np
import pytest

from unitsface.errors import UnitsfaceError
from unitsface.evaluation import megaface
from unitsface.evaluation.megaface import clean_probes, evaluate_megaface


def _data(seed=0, n_id=6, per_id=5, n_dis=700, d=16):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_id, d))
    ids = np.repeat(np.arange(n_id), per_id)
    probes = centres[ids] + 0.8 * rng.normal(size=(len(ids), d))
    distractors = rng.normal(size=(n_dis, d)) + 0.5 * centres[rng.integers(0, n_id, n_dis)]
    return probes * rng.uniform(0.5, 3, (len(ids), 1)), ids, distractors  # arbitrary norms: normalised inside


def _brute(p, ids, dis, ranks, far):
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    dis = dis / np.linalg.norm(dis, axis=1, keepdims=True)
    s = p @ dis.T  # the full probe x distractor matrix
    hits, trials = dict.fromkeys(ranks, 0), 0
    for j in range(len(p)):
        for i in range(len(p)):
            if i != j and ids[i] == ids[j]:
                trials += 1
                for k in ranks:
                    hits[k] += np.sum(s[j] > p[j] @ p[i]) < k  # ties would count as success
    gen = np.array([p[i] @ p[j] for i in range(len(p)) for j in range(i + 1, len(p)) if ids[i] == ids[j]])
    imp = np.sort(s.ravel())[::-1]
    allowed = int(np.floor(far * imp.size + 1e-9))
    tar = max(np.mean(gen >= t) for t in np.r_[gen, np.inf] if np.sum(imp >= t) <= allowed)
    return {k: hits[k] / trials for k in ranks}, tar, trials


@pytest.mark.parametrize("as_blocks", [False, True])
def test_chunked_equals_brute_force(monkeypatch, as_blocks):
    p, ids, dis = _data()
    monkeypatch.setattr(megaface, "SCORE_BLOCK", 30 * 37)  # 37 distractors per chunk: many chunks
    src = [dis[:250], dis[250:251], dis[251:]] if as_blocks else dis
    res = evaluate_megaface(p, ids, src, ranks=(1, 3, 10), far=2e-3)
    rates, tar, trials = _brute(p, ids, dis, (1, 3, 10), 2e-3)
    assert res["identification"] == rates
    assert res["tar_at_far"] == {2e-3: tar}
    assert res["n_trials"] == trials == 6 * 5 * 4
    assert res["n_impostor"] == 30 * 700 and res["variant"] == "raw"
    assert 0 < rates[1] < rates[10] < 1  # the case is neither trivial nor hopeless


def test_memmap_distractors(tmp_path):
    p, ids, dis = _data(seed=1)
    mm = np.lib.format.open_memmap(tmp_path / "dis.npy", mode="w+", dtype=np.float32, shape=dis.shape)
    mm[:] = dis
    mm.flush()
    res = evaluate_megaface(p.astype(np.float32), ids, np.load(tmp_path / "dis.npy", mmap_mode="r"))
    ref = evaluate_megaface(p.astype(np.float32), ids, dis.astype(np.float32))
    assert res == ref


def test_refined_variant_equals_brute_force_on_cleaned_data():
    p, ids, dis = _data(seed=2)
    noisy_p = np.zeros(len(p), bool)
    noisy_p[[0, 7, 8]] = True
    noisy_d = np.zeros(len(dis), bool)
    noisy_d[::7] = True
    res = evaluate_megaface(p, ids, dis, ranks=(1,), far=1e-2, probe_noise=noisy_p, distractor_noise=noisy_d)
    cleaned = p / np.linalg.norm(p, axis=1, keepdims=True)
    for i in np.flatnonzero(noisy_p):
        m = cleaned[(ids == ids[i]) & ~noisy_p].mean(0)
        cleaned[i] = m / np.linalg.norm(m)
    np.testing.assert_allclose(clean_probes(p, ids, noisy_p), cleaned, atol=1e-15)
    rates, tar, _ = _brute(cleaned, ids, dis[~noisy_d], (1,), 1e-2)
    assert res["identification"] == rates and res["tar_at_far"] == {1e-2: tar}
    assert res["variant"] == "refined" and res["n_distractors"] == len(dis) - noisy_d.sum()


def test_errors():
    p, ids, dis = _data()
    with pytest.raises(UnitsfaceError, match="one id per row"):
        evaluate_megaface(p, ids[:-1], dis)
    with pytest.raises(UnitsfaceError, match="distractor dim 8 differs from probe dim 16"):
        evaluate_megaface(p, ids, dis[:, :8])
    with pytest.raises(UnitsfaceError, match="no probe identity has two"):
        evaluate_megaface(p, np.arange(len(p)), dis)
    with pytest.raises(UnitsfaceError, match="distractor noise mask must have 700"):
        evaluate_megaface(p, ids, dis, distractor_noise=np.zeros(5, bool))
    with pytest.raises(UnitsfaceError, match="identity 0: every image is on the noise list"):
        evaluate_megaface(p, ids, dis, probe_noise=ids == 0)
    bad = dis.copy()
    bad[3, 2] = np.inf
    with pytest.raises(UnitsfaceError, match="NaN or infinite"):
        evaluate_megaface(p, ids, bad)
