"""Record llama.cpp's logits on a synthetic file of each family and layout (tests/test_families.py
compares zephyr's with them): the cases are zephyr.testing.family_cases, the files its seeded writer.

Produced with llama-cpp-python 0.3.36 built from source (AVX2, FMA, F16C; no AVX-512), 2 threads:
    python tests/data/make_family_reference.py
"""
import json
import tempfile
from pathlib import Path

import numpy as np

import llama_cpp
from zephyr.testing.family_cases import FAMILIES, LAYOUTS, file_sha256, llama_cpp_logits, steps, write_case

OUT = Path(__file__).with_name("family_reference.npz")

with tempfile.TemporaryDirectory() as tmp:
    arrays, files = {}, {}
    for family in FAMILIES:
        for layout in LAYOUTS:
            path = write_case(Path(tmp), family, layout)
            arrays[f"{family}-{layout}"] = llama_cpp_logits(path)
            files[f"{family}-{layout}"] = file_sha256(path)
            print(family, layout, "logit scale", float(np.abs(arrays[f"{family}-{layout}"]).max()))
meta = {"source": f"llama-cpp-python {llama_cpp.__version__}, logits after each step", "steps": steps(),
        "sha256": files}
np.savez_compressed(OUT, meta=np.array(json.dumps(meta)), **arrays)
print(f"wrote {OUT}")
