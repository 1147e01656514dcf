"""The cache of generated synthetic sets, so `make demo` renders its data only once.

A set lives in `<cache>/synthetic-<parameters>/`; it is generated into a temporary folder
and renamed into place by `write_synthetic_dataset`, so a folder that exists is complete.
"""

from __future__ import annotations

import os
from pathlib import Path

from unitsface.data.synthetic import GENERATOR_VERSION, write_synthetic_dataset


def default_cache() -> Path:
    """$UNITSFACE_CACHE, else $XDG_CACHE_HOME/unitsface, else ~/.cache/unitsface."""
    if os.environ.get("UNITSFACE_CACHE"):
        return Path(os.environ["UNITSFACE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unitsface"


def cached_synthetic_dataset(
    cache: str | Path | None, identities: int, images_per_identity: int, seed: int, val_pairs: int,
    heldout_identities: int = 100, heldout_images: int = 8,
) -> Path:
    """The folder of the synthetic set with these parameters, generating it on first use."""
    root = Path(cache).expanduser() if cache else default_cache()
    folder = root / (f"synthetic-v{GENERATOR_VERSION}-{identities}x{images_per_identity}-s{seed}-p{val_pairs}"
                     f"-h{heldout_identities}x{heldout_images}")
    if not (folder / "manifest.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        print(f"generating the synthetic face set into {folder} (once)", flush=True)
        write_synthetic_dataset(folder, identities, images_per_identity, seed, val_pairs=val_pairs,
                                heldout_identities=heldout_identities, heldout_images=heldout_images)
    return folder
