"""Names that go to the Hugging Face Hub: which settings are hub names, whether the Hub can be
reached, and one message for every name that cannot be had on this machine.

Without this, a hub name on a machine without network costs five retries per file (about 50
seconds), then a message about the first file tried, often the tokenizer's, under a key the user
never set; and the dataset fails separately on the next try. `check_hub_names` asks the network
once, before anything is loaded. Offline (HF_HUB_OFFLINE=1, or no answer from the Hub), it turns on
the libraries' offline mode so that cached names load at once, and it lists every name that is
neither a local path nor in the cache, with the key that named it and the fix.
"""

from __future__ import annotations

import glob
import os
import re
import socket
import sys
from typing import Optional
from urllib.parse import urlparse

from dft_ds.config import SYNTHETIC, Config
from dft_ds.errors import UserError

# owner/name, as the Hub spells repositories: letters, digits, '-', '_' and '.', no leading dot.
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
PROBE_TIMEOUT_S = 3.0
TRUE = ("1", "ON", "YES", "TRUE")


def looks_like_hub_name(name: str) -> bool:
    return bool(HUB_NAME.match(name)) and not name.endswith((".json", ".jsonl", ".parquet", ".yaml", ".txt"))


def hub_names(cfg: Config) -> list[tuple[str, str, str]]:
    """(key, name, kind) for each setting that names something not on this machine; kind is model or
    dataset. The tokenizer counts under model.name_or_path when model.tokenizer is null."""
    out = []
    model = cfg.model.name_or_path
    for key, name, kind in (("model.name_or_path", model, "model"), ("model.tokenizer", cfg.model.tokenizer, "model"),
                            ("data.source", cfg.data.source, "dataset"),
                            ("data.eval_source", cfg.data.eval_source, "dataset")):
        if name is None or name == SYNTHETIC or os.path.exists(os.path.expanduser(name)):
            continue
        if kind == "dataset" and glob.has_magic(name):  # a pattern of local files: data.py names what it matches
            continue
        if key == "model.tokenizer" and name == model:
            continue
        out.append((key, name, kind))
    return out


def offline_requested() -> bool:
    return any(os.environ.get(v, "").upper() in TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """None when the Hub's host answers a TCP connection, else why not (one try, `timeout` seconds)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or endpoint, url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port} does not answer ({exc.strerror or exc})"


def go_offline() -> None:
    """Offline mode for huggingface_hub, transformers and datasets, in this process and its children.
    The libraries read the variable when imported, so the ones already imported are told directly."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    ds = sys.modules.get("datasets.config")
    if ds is not None:
        ds.HF_HUB_OFFLINE = ds.HF_DATASETS_OFFLINE = True


def is_cached(name: str, kind: str) -> bool:
    """Whether the local Hugging Face cache holds the repository (a model's config.json, or any
    download or prepared copy of a dataset)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if kind == "model":
        return isinstance(try_to_load_from_cache(name, "config.json"), str) or \
            isinstance(try_to_load_from_cache(name, "tokenizer_config.json"), str)
    folder = os.path.join(constants.HF_HUB_CACHE, "datasets--" + name.replace("/", "--"))
    datasets_cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets")
    prepared = os.path.join(datasets_cache, name.replace("/", "___"))
    return os.path.isdir(os.path.join(folder, "snapshots")) or os.path.isdir(prepared)


def _local_parent(name: str) -> Optional[str]:
    """The deepest folder of `name` that exists here, when at least its first part does (None for a
    name none of whose parts is here)."""
    parts = os.path.expanduser(name).split(os.sep)
    found = None
    for i in range(1, len(parts)):
        folder = os.sep.join(parts[:i]) or os.sep
        if not os.path.isdir(folder):
            break
        found = folder
    return found


def _nearest(name: str) -> str:
    """'; the nearest there is PATH' for a path whose folder exists, naming the closest entry by spelling."""
    import difflib

    folder = _local_parent(name)
    if folder is None:
        return ""
    rest = os.path.expanduser(name)[len(folder):].lstrip(os.sep)
    wanted = rest.split(os.sep)[0]
    try:
        entries = sorted(e for e in os.listdir(folder) if not e.startswith("."))
    except OSError:
        return ""
    close = difflib.get_close_matches(wanted, entries, n=1, cutoff=0.5)
    if close:
        return f"; the nearest there is '{os.path.join(folder, close[0])}'"
    listed = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "")
    return f"; '{folder}' holds {listed or 'nothing'}"


def check_hub_names(cfg: Config, probe=hub_unreachable) -> None:
    """Every name of a run that must come from the Hub can (see check_names)."""
    check_names(hub_names(cfg), probe, tokenizer_too=cfg.model.tokenizer is None)


def check_names(names: list[tuple[str, str, str]], probe=hub_unreachable, tokenizer_too: bool = False) -> None:
    """(key, name, kind) of names not on this machine: refuse, in one UserError, those that are not
    owner/name, and, offline (asked once), the hub names the cache lacks."""
    problems = [f"{key}: '{name}' does not exist here, and it is not a hub name (those look like owner/name)"
                f"{_nearest(name)}" for key, name, _ in names if not looks_like_hub_name(name)]
    mistyped = [(k, n, kind) for k, n, kind in names
                if looks_like_hub_name(n) and _local_parent(n) and not is_cached(n, kind)]
    problems += [f"{key}: '{name}' does not exist here; its folder '{_local_parent(name)}' does, so it is read as a "
                 f"local path, not a hub name{_nearest(name)}" for key, name, _ in mistyped]
    remote = [(k, n, kind) for k, n, kind in names if looks_like_hub_name(n) and (k, n, kind) not in mistyped]
    why = None
    if remote:
        why = "offline mode is on: HF_HUB_OFFLINE=1" if offline_requested() else probe()
    missing = []
    if why is not None:
        go_offline()
        missing = [(k, n, kind) for k, n, kind in remote if not is_cached(n, kind)]
        problems += [f"{key}: '{name}' is not in the local cache ({kind}"
                     f"{', and the tokenizer, as model.tokenizer is null' if key == 'model.name_or_path' and tokenizer_too else ''})"
                     for key, name, kind in missing]
    if not problems:
        return
    head = (f"the Hugging Face Hub is out of reach ({why}), and these settings name nothing this machine can load:"
            if missing else "these settings name nothing that can be loaded:")
    fix = "set each to an existing local path (a model directory, a data file or a saved dataset)"
    if missing:
        downloads = "; ".join(f"hf download {n}{' --repo-type dataset' if kind == 'dataset' else ''}"
                              for _, n, kind in missing)
        fix += (f", or fill the cache on a machine with network ({downloads}) and run here with HF_HUB_OFFLINE=1 "
                "and HF_HOME pointing at that cache")
    raise UserError("\n  - ".join([head] + problems) + "\n" + fix)
