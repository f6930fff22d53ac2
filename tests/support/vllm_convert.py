"""Convert the bundled SmolLM2 GGUF to a safetensors folder that vLLM can serve.

Runs inside ``.parley/venv-vllm`` (it needs torch, transformers and gguf, which the project
venv does not have), so it imports nothing of the project::

    .parley/venv-vllm/bin/python tests/support/vllm_convert.py MODEL.gguf OUT_DIR

transformers dequantises the GGUF on load; the result is marked as quantized and has no
architecture, so both are cleared before ``save_pretrained``. The folder is written next to
``OUT_DIR`` and renamed into place, so an interrupted run leaves no half-written model.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def convert(gguf: Path, out: Path) -> None:
    torch: Any = importlib.import_module("torch")
    transformers: Any = importlib.import_module("transformers")
    started = time.monotonic()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["LlamaForCausalLM"]
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(out)
    print(f"converted {gguf.name} -> {out} in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: vllm_convert.py MODEL.gguf OUT_DIR")
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
