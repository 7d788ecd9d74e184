"""The worker's metrics read other engines' Prometheus pages: llama-server's unlabelled
names, and vLLM's and SGLang's labelled ones (summed over their labels), each mapped onto
the same `corral_worker_*` figures."""

from __future__ import annotations

from workers.metrics_server import engine_figures, parse_samples

LLAMA = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 12
llamacpp:tokens_predicted_total 340
llamacpp:requests_processing 1
"""

VLLM = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen"} 2.0
vllm:num_requests_running{engine="1",model_name="qwen"} 1.0
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="qwen"} 1.5e+03
vllm:prompt_tokens_created{engine="0",model_name="qwen"} 1.7e+09
vllm:generation_tokens_total{engine="0",model_name="qwen"} 4096.0
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="qwen"} 0.0
"""

SGLANG = """\
sglang:prompt_tokens_total{model_name="llama"} 8.128902e+06
sglang:generation_tokens_total{model_name="llama"} 7.557572e+06
sglang:num_running_reqs{model_name="llama"} 3
"""


def test_llama_server_names() -> None:
    assert engine_figures(parse_samples(LLAMA)) == {"busy": 1, "prompt": 12, "generated": 340}


def test_vllm_names_summed_over_labels() -> None:
    samples = parse_samples(VLLM)
    assert samples["vllm:num_requests_running"] == 3
    assert engine_figures(samples) == {"busy": 3, "prompt": 1500, "generated": 4096}


def test_sglang_names() -> None:
    found = engine_figures(parse_samples(SGLANG))
    assert found == {"busy": 3, "prompt": 8128902, "generated": 7557572}


def test_an_engine_without_known_names_reports_none() -> None:
    assert engine_figures(parse_samples("other_metric 1\n# comment\n")) == {}
