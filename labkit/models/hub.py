"""Checkpoints by Hugging Face Hub name, as vLLM takes them: a model or tokenizer argument that is
not an existing path is a repo id ("Qwen/Qwen2.5-1.5B-Instruct").

The snapshot is looked up in the local Hub cache first (`HF_HOME`/`HF_HUB_CACHE`, or
`download_dir`), with no network call; only a missing one is downloaded (with huggingface_hub's
progress bars, `HF_TOKEN` for gated repos), and only the files labkit reads: the configs, the
safetensors weights and their index, the tokenizer files; pickled `*.bin` weights only with
`load_format="pt"`. With `HF_HUB_OFFLINE=1` nothing is downloaded. Every failure is one
ValueError that names the repo and says what to do.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_FILES = ["config.json", "generation_config.json"]
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "*.tiktoken",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
]
WEIGHT_FILES = ["*.safetensors", "model.safetensors.index.json"]


def is_hub_name(name: str) -> bool:
    """Not a path on this machine: then it names a Hub repo (`org/name` or `name`)."""
    return not Path(name).expanduser().exists() and not name.startswith(("/", "./", "../", "~"))


def patterns(load_format: str, tokenizer_only: bool = False) -> list[str]:
    """The files to fetch for a model (or its tokenizer alone)."""
    if tokenizer_only:
        return TOKENIZER_FILES
    weights = (
        []
        if load_format == "dummy"
        else WEIGHT_FILES + (["*.bin", "*.bin.index.json"] if load_format == "pt" else [])
    )
    return CONFIG_FILES + TOKENIZER_FILES + weights


def snapshot(
    repo_id: str,
    *,
    revision: str | None,
    download_dir: str | None,
    allow_patterns: list[str],
    what: str = "model",
) -> Path:
    """The local directory of `repo_id` at `revision`, downloading what is missing."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    kwargs = {"revision": revision, "cache_dir": download_dir, "allow_patterns": allow_patterns}
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True, **kwargs))
    except (errors.LocalEntryNotFoundError, FileNotFoundError):
        pass
    except errors.HFValidationError as e:
        raise ValueError(
            f"{what}: {repo_id!r} is neither an existing path nor a valid Hugging "
            f"Face repo id ({e})"
        ) from None
    if constants.HF_HUB_OFFLINE:
        raise ValueError(
            f"{what}: {repo_id!r} is not a local path, and its snapshot"
            f"{' at revision ' + revision if revision else ''} is not in the Hugging "
            f"Face cache ({download_dir or constants.HF_HUB_CACHE}) while "
            "HF_HUB_OFFLINE=1: download it on a machine with network access "
            f"(`huggingface-cli download {repo_id}`) or unset HF_HUB_OFFLINE"
        )
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, **kwargs))
    except errors.GatedRepoError:
        raise ValueError(
            f"{what}: {repo_id!r} is a gated repo: accept its terms on the Hub and "
            "set HF_TOKEN to a token of that account"
        ) from None
    except errors.RepositoryNotFoundError:
        raise ValueError(
            f"{what}: no Hugging Face repo {repo_id!r} (or it is private: set "
            "HF_TOKEN); a local checkpoint must be an existing path"
        ) from None
    except errors.RevisionNotFoundError:
        raise ValueError(f"{what}: {repo_id!r} has no revision {revision!r}") from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise ValueError(
            f"{what}: could not download {repo_id!r} from the Hugging Face Hub "
            f"({type(e).__name__}: {e}); check the network, or set HF_HUB_OFFLINE=1 "
            "to use the local cache only"
        ) from None
