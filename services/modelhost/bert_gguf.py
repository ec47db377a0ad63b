"""Convert a sentence-transformers BERT (safetensors + tokenizer.json) to a GGUF llama.cpp loads.

llama.cpp's own converter needs torch; this one needs only numpy, ``safetensors`` and ``gguf``
(gguf-py, whose ``TensorNameMap`` names the tensors as llama.cpp's BERT loader expects). The
weights are written f16 (norms and biases f32), the pooling is the model's (mean for the
all-MiniLM family), and the WordPiece vocabulary is spelt the way llama.cpp's WPM tokenizer
reads it: a word-initial piece carries a leading "▁", a ``##`` continuation loses its ``##``.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load as load_safetensors

from services.modelhost.catalog import file_sha256

# sentence-transformers' pooling modes, as llama.cpp names them.
_POOLING = {
    "pooling_mode_mean_tokens": gguf.PoolingType.MEAN,
    "pooling_mode_cls_token": gguf.PoolingType.CLS,
    "pooling_mode_lasttoken": gguf.PoolingType.LAST,
}
# Tensors llama.cpp's BERT graph has no use for (the pooler feeds only CLS classification).
_SKIPPED = ("embeddings.position_ids", "pooler.")


Read = Callable[[str], bytes]
"""The bytes of a file of the model by its relative path (``zipfile.ZipFile.read``)."""


def pooling_type(read: Read) -> gguf.PoolingType:
    """The pooling ``1_Pooling/config.json`` asks for (mean when the model has none)."""
    try:
        config = json.loads(read("1_Pooling/config.json"))
    except KeyError:
        return gguf.PoolingType.MEAN
    for key, pooling in _POOLING.items():
        if config.get(key):
            return pooling
    raise ValueError("1_Pooling/config.json: no pooling mode llama.cpp has")


def wpm_token(piece: str) -> str:
    """A WordPiece vocabulary entry as llama.cpp's WPM tokenizer spells it."""
    if piece.startswith("[") and piece.endswith("]"):
        return piece  # special tokens ([CLS], [unused0]) stay whole
    if piece.startswith("##"):
        return piece[2:]
    return "\u2581" + piece


def _write_vocab(writer: gguf.GGUFWriter, tokenizer: dict, vocab_size: int) -> None:
    vocab = tokenizer["model"]["vocab"]
    tokens = [""] * vocab_size
    for piece, index in vocab.items():
        tokens[index] = piece
    special = {added["content"]: added["id"] for added in tokenizer["added_tokens"]}
    types = [
        gguf.TokenType.CONTROL if piece in special else gguf.TokenType.NORMAL for piece in tokens
    ]
    writer.add_tokenizer_model("bert")
    writer.add_token_list([wpm_token(piece) for piece in tokens])
    writer.add_token_types(types)
    # The template is "[CLS] text [SEP]": CLS is BOS and SEP is EOS to llama.cpp.
    writer.add_bos_token_id(special["[CLS]"])
    writer.add_eos_token_id(special["[SEP]"])
    writer.add_sep_token_id(special["[SEP]"])
    writer.add_unk_token_id(special["[UNK]"])
    writer.add_pad_token_id(special["[PAD]"])
    writer.add_mask_token_id(special["[MASK]"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)


def convert(read: Read, out: Path, name: str) -> None:
    """Write ``out`` (a GGUF) from the sentence-transformers model whose files ``read`` gives."""
    config = json.loads(read("config.json"))
    if config.get("model_type") != "bert":
        raise ValueError(f"model_type {config.get('model_type')!r} is not bert")
    tokenizer = json.loads(read("tokenizer.json"))
    layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, layers)

    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(layers)
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_pooling_type(pooling_type(read))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_token_type_count(config.get("type_vocab_size", 1))
    _write_vocab(writer, tokenizer, config["vocab_size"])

    for source, tensor in load_safetensors(read("model.safetensors")).items():
        if source.startswith(_SKIPPED):
            continue
        target = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"no llama.cpp BERT tensor for {source}")
        # Matrices in f16 halve the file. Norms and biases stay f32, and so do the token
        # type embeddings: llama.cpp adds their row as it is, and an f16 add aborts.
        half = tensor.ndim == 2 and target != "token_types.weight"
        dtype = np.float16 if half else np.float32
        writer.add_tensor(target, tensor.astype(dtype))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def converted(archive: Path, models_dir: Path, stem: str) -> Path:
    """The GGUF of the model zipped in ``archive``, converted once into ``models_dir``.

    The file is named by the archive's sha256, so a changed package converts again and an
    unchanged one is reused; it is written to a temporary name and renamed into place, so
    a host stopped mid-way (or a replica converting beside it) never leaves half a file.
    """
    key = file_sha256(archive)[:16]
    path = models_dir / f"{stem}.{key}.f16.gguf"
    if path.is_file():
        return path
    models_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(archive) as model:
            convert(model.read, partial, stem)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    for stale in models_dir.glob(f"{stem}.*.f16.gguf"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return path
