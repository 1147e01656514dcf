"""The shipped presets (issue 12 item 3): every one validates, builds its backbone and head at reduced size and
trains the head a step; every recipe's comment names what it reproduces, the data, the GPUs and the numbers to
expect; `unitsface train --list-presets` shows each with one line; an unknown name lists the valid ones."""

from __future__ import annotations

import re
from importlib import resources

import pytest
import torch

from unitsface import heads, models
from unitsface.cli import main
from unitsface.config import backbone_params, load_config, preset_summary, presets
from unitsface.errors import UnitsfaceError

TOOLS = {"demo", "bench_losses", "bench_threshold"}  # presets of unitsface's own commands, not published recipes
RECIPES = sorted(set(presets()) - TOOLS)
FIELDS = ("Reproduces", "Data", "GPUs", "Expect")
FIELD = re.compile(r"^(\w+)(?: \([^)]*\))?: (.*)")  # "Expect (Table 5): ..."
ISSUE_RECIPES = {  # issue 12 item 3: (head, data folder, backbone) of each recipe it asks for
    "casia_r50_unitsface": ("unitsface", "faces_webface_112x112", "lresnet50e_ir"),
    "wf4m_r50_unitsface": ("unitsface", "WebFace4M", "lresnet50e_ir"),
    "wf42m_r200_unitsface": ("unitsface", "WebFace42M", "lresnet200e_ir"),
    "casia_r50_uniface": ("uce", "faces_webface_112x112", "lresnet50e_ir"),
    "ms1mv2_r100_uniface": ("uce", "faces_emore", "lresnet100e_ir"),
    "ms1mv2_r100_epl": ("cosface_epl", "faces_emore", "lresnet100e_ir"),
    "ms1mv2_r100_cosface_unpg": ("cosface_unpg", "faces_emore", "iresnet100"),
    "wf4m_r50_cosface_unpg": ("cosface_unpg", "WebFace4M", "iresnet50"),
    "ms1mv2_r100_magface": ("magface", "faces_emore", "iresnet100"),
    "ms1mv2_r100_adaface": ("adaface", "faces_emore", "iresnet100"),
    "ms1mv3_r50_arcface": ("arcface", "ms1m-retinaface-t1", "iresnet50"),
    "ms1mv3_r100_arcface": ("arcface", "ms1m-retinaface-t1", "iresnet100"),
    "glint360k_r100_cosface": ("cosface", "glint360k", "iresnet100"),
    "wf42m_r100_cosface_pfc03": ("cosface", "WebFace42M", "iresnet100"),
    "wf42m_vit_t_cosface": ("cosface", "WebFace42M", "vit_t"),
    "casia_r50_unitsface_mask": ("unitsface", "faces_webface_112x112", "lresnet50e_ir"),  # issue 11: MFR training
}


def comment(name: str) -> str:
    """The leading comment block of a preset, '#' and indentation stripped, continuation lines joined."""
    lines = (resources.files("unitsface") / "configs" / f"{name}.yaml").read_text().splitlines()
    block = [line[2:].rstrip() for line in lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))]]
    return "\n".join(block).replace("\n  ", " ")


def test_the_issue_recipes_are_shipped() -> None:
    assert set(RECIPES) == set(ISSUE_RECIPES)
    for name, (head, data, backbone) in ISSUE_RECIPES.items():
        config = load_config(name)
        assert config["head"]["name"] == head, name
        assert config["data"]["train"] == f"data/{data}", name
        assert config["model"]["backbone"] == backbone, name
        assert all(v.startswith(f"data/{data}/") and v.endswith(".bin") for v in config["data"]["val"]), name
        assert config["output"] == f"runs/{name}", name


@pytest.mark.parametrize("name", presets())
def test_preset_validates_and_builds_at_reduced_size(name: str) -> None:
    """The backbone is built at full depth on the meta device (no memory, no time), the head for 6 classes and
    8-d embeddings, and the head trains one step on CPU."""
    config = load_config(name)
    with torch.device("meta"):
        model = models.build(config["model"]["backbone"], embedding_size=8, **backbone_params(config))
    assert sum(p.numel() for p in model.parameters()) > 0
    params = {k: v for k, v in config["head"].items() if k != "name"}
    head = heads.build(config["head"]["name"], 6, 8, **params).train()
    g = torch.Generator().manual_seed(0)
    x = (8.0 * torch.randn(12, 8, generator=g)).requires_grad_()
    loss = head(x, torch.tensor([0, 1, 2, 3, 4, 5] * 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_comment_names_paper_data_gpus_and_expected_numbers(name: str) -> None:
    text = comment(name)
    fields = {m[1]: m[2] for m in map(FIELD.match, text.splitlines()) if m}
    assert set(FIELDS) <= set(fields), f"{name}: missing {set(FIELDS) - set(fields)}"
    assert re.search(r"\d+ (×|GPU)", fields["GPUs"]), name  # a GPU count
    # the numbers to expect, or a plain statement that nothing was published and what to compare with instead
    assert re.search(r"\d\d\.\d\d", fields["Expect"]), name
    assert "nothing published" in fields["Expect"] or "no table" not in fields["Reproduces"], name
    assert preset_summary(name) == text.splitlines()[0] and len(preset_summary(name)) <= 120


def test_list_presets_prints_one_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--list-presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == presets()
    for line, name in zip(lines, presets()):
        assert line.endswith(preset_summary(name)) and preset_summary(name), name


def test_an_unknown_preset_lists_the_valid_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UnitsfaceError) as info:
        load_config("ms1mv2_r100_arcfce")
    message = str(info.value)
    assert "\n" not in message and "no config file or preset named 'ms1mv2_r100_arcfce'" in message
    assert all(name in message for name in presets())
    assert main(["train", "--config", "ms1mv2_r100_arcfce"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
