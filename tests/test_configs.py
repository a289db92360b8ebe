"""Every shipped config parses into an EngineConfig, and bad configs fail naming the key."""

from pathlib import Path

import pytest

from tinker_jax.config import EngineConfig, SamplerConfig
from tinker_jax.models.sharding import MeshConfig

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"default.yaml", "cpu-mesh8.yaml", "gpu-bf16.yaml", "tpu-v5e-8.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    cfg = EngineConfig.load(path)
    assert cfg.dtype in ("float32", "bfloat16")
    assert cfg.mesh.size >= 1


def test_specific_values():
    assert EngineConfig.load(CONFIGS[0].parent / "cpu-mesh8.yaml").mesh == MeshConfig(data=1, fsdp=2, tensor=4)
    gpu = EngineConfig.load(CONFIGS[0].parent / "gpu-bf16.yaml")
    assert gpu.dtype == "bfloat16" and gpu.remat and gpu.sampler.max_batch == 64
    assert gpu.attention == "auto" and gpu.sampler.decode_steps == 32 and not gpu.sampler.decode_unroll


def test_bad_configs_name_the_key(tmp_path):
    for text, key in (("dtpe: float32\n", "dtpe"), ("dtype: float16\n", "dtype"), ("mesh: {pipeline: 2}\n", "pipeline"),
                      ("sampler: {max_rows: 2}\n", "max_rows"),
                      ("sampler: {quantize: int4}\n", "sampler.quantize"),
                      ("sampler: {decode_attention: flash}\n", "sampler.decode_attention"),
                      ("sampler: {prefill_attention: flash}\n", "sampler.prefill_attention"),
                      ("sampler: {backend: vllm, quantize: int8}\n", "sampler.quantize"),
                      ("sampler: {burst_gap_ms: -1}\n", "sampler.burst_gap_ms")):
        f = tmp_path / "bad.yaml"
        f.write_text(text)
        with pytest.raises(ValueError, match=key):
            EngineConfig.load(f)
    # built in process, the sampler's settings are checked as they are given, with the same names
    for kw, key in ((dict(decode_attention="flash"), "sampler.decode_attention"), (dict(dtype="fp16"), "sampler.dtype"),
                    (dict(quantize="int4"), "sampler.quantize"), (dict(backend="vllm", quantize="int8"),
                                                                  "sampler.quantize"),
                    (dict(burst_gap_ms="2"), "sampler.burst_gap_ms"), (dict(prefill_attention="paged"),
                                                                       "sampler.prefill_attention")):
        with pytest.raises(ValueError, match=key):
            SamplerConfig(**kw)
    for kw, key in ((dict(dtype="float16"), "config.dtype"), (dict(attention="flash"), "config.attention")):
        with pytest.raises(ValueError, match=key):
            EngineConfig(**kw)
