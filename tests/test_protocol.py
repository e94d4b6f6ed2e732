"""Wire validation: every bad input becomes an InvalidRequest naming the field."""

import pytest

from fma_common.errors import InvalidRequest, UnsupportedParameter
from fma_common.http import parse_model
from fma_common.wire import ChatCompletionRequest, CompletionRequest, Limits

LIMITS = Limits(max_tokens=100, max_n=4, context_length=50)


def bad(model, payload) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_model(model, payload)
    return info.value


@pytest.mark.parametrize("payload, param", [
    ({"prompt": "x"}, "model"),
    ({"model": "m"}, "prompt"),
    ({"model": "m", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": "x", "temperature": 3}, "temperature"),
    ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "prompt": "x", "stop": 7}, "stop"),
    ({"model": "m", "prompt": []}, "prompt"),
    ({"model": "m", "prompt": "x", "n": 0}, "n"),
    ({"model": "m", "prompt": "x", "seed": 1.5}, "seed"),
    ({"model": "m", "prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"model": "m", "prompt": "x", "logit_bias": {"\u00b2": 1}}, "logit_bias"),  # "²".isdigit() is True
    ({"model": "m", "prompt": "x", "logit_bias": {"\u0663": 1}}, "logit_bias"),  # an Arabic-Indic 3
    ({"model": "m", "prompt": "x", "seed": 2**64}, "seed"),  # torch refuses it: must be a 400, not a 500
    ({"model": "m", "prompt": "x", "seed": -(2**63) - 1}, "seed"),
])
def test_completion_field_errors_name_the_field(payload, param):
    err = bad(CompletionRequest, payload)
    assert err.status == 400
    assert err.param is not None and err.param.startswith(param)


@pytest.mark.parametrize("payload, param", [
    ({"model": "m", "prompt": "x", "logprobs": 2}, "logprobs"),
    ({"model": "m", "prompt": "x", "suffix": "y"}, "suffix"),
    ({"model": "m", "prompt": "x", "best_of": 3}, "best_of"),
])
def test_unsupported_completion_parameters_are_refused(payload, param):
    err = bad(CompletionRequest, payload)
    assert isinstance(err, UnsupportedParameter)
    assert err.param == param


@pytest.mark.parametrize("payload, param", [
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_object"}}, "response_format"),
])
def test_chat_errors_name_the_field(payload, param):
    err = bad(ChatCompletionRequest, payload)
    assert err.param is not None and err.param.startswith(param)


def test_body_that_is_not_an_object_is_refused():
    with pytest.raises(InvalidRequest, match="JSON object"):
        parse_model(CompletionRequest, ["model"])


def test_max_tokens_over_the_limit_is_refused_with_the_limit_in_the_message():
    req = parse_model(CompletionRequest, {"model": "m", "prompt": "x", "max_tokens": 101})
    with pytest.raises(InvalidRequest, match="limit of 100"):
        req.to_sampling_params(1, LIMITS, 1000)


def test_prompt_plus_completion_over_the_context_window_is_refused():
    req = parse_model(CompletionRequest, {"model": "m", "prompt": "x", "max_tokens": 20})
    with pytest.raises(InvalidRequest) as info:
        req.to_sampling_params(40, LIMITS, 1000)
    assert info.value.code == "context_length_exceeded"
    assert "maximum context length is 50" in info.value.message


def test_default_max_tokens_fits_the_remaining_context():
    req = parse_model(CompletionRequest, {"model": "m", "prompt": "x"})
    assert req.to_sampling_params(45, LIMITS, 1000).max_tokens == 5
    assert req.to_sampling_params(1, LIMITS, 1000).max_tokens == 16


def test_n_over_the_limit_is_refused():
    req = parse_model(CompletionRequest, {"model": "m", "prompt": "x", "n": 5})
    with pytest.raises(InvalidRequest, match="n must be <= 4"):
        req.to_sampling_params(1, LIMITS, 1000)


def test_chat_max_completion_tokens_is_used_and_developer_maps_to_system():
    req = parse_model(ChatCompletionRequest, {"model": "m", "max_completion_tokens": 7, "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]})
    assert req.to_sampling_params(3, LIMITS, 1000).max_tokens == 7
    assert req.chat_messages() == [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "hi there"}]
