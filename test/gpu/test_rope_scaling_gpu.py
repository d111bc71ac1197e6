"""A YaRN Qwen3 on CUDA (fused q/k-norm + rope kernel, which reads the scaled cos/sin cache) against
transformers on the CPU: the unit test's check (test/unit/test_model_families.py) on the GPU."""

from __future__ import annotations

import pytest

from test.unit.test_model_families import check_forward


@pytest.mark.parametrize("arch", ["qwen3", "qwen3-yarn"])
@pytest.mark.parametrize("backend", ["triton", "torch_native"])
def test_yarn_qwen3_matches_transformers_on_cuda(tmp_path, arch, backend):
    check_forward(tmp_path, arch, "cuda", tol=2e-3, attention_backend=backend, disable_cuda_graph=True)
