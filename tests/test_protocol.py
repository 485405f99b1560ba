"""The command protocol: every command survives encode -> decode unchanged; bad headers are refused clearly."""

import pytest
import torch

from hf_hetermoe import protocol as p

EXAMPLES = [
    p.Setup(config={"model_type": "mixtral", "placement": {"owner": {"0": [1, 2]}}, "dtype": "torch.float32"}),
    p.Setup(config={"model_type": "mixtral"}, frozen=True),
    p.Forward(layer=3, stripe=1, session=12345678901, keep=True, autocast=torch.bfloat16, row_dtype=torch.float32,
              seq_len=8192),
    p.Forward(layer=0, stripe=0, session=1, keep=False, autocast=None, row_dtype=torch.float16, seq_len=1),
    p.Backward(layer=7, stripe=3, session=2),
    p.OptimSetup(spec={"class": "torch.optim.adamw:AdamW", "groups": [{"hyperparams": {"lr": 1e-3}, "params": ["w"]}]}),
    p.GradNorm(unscale=1 / 65536),
    p.Step(clip_coef=0.123456789, lrs=(1e-4, 2e-5, 0.0), skipped=False),
    p.Step(clip_coef=1.0, lrs=(), skipped=True),
    p.FetchWeights(), p.LoadWeights(), p.FetchOptim(), p.LoadOptim(), p.Stop(), p.Stats(),
    p.Abort(reason="attention rank 1: ValueError: ünïcode reason"),
    p.Move(placement={"num_experts": 4, "owner": {"0": [2, 2, 0, 3], "1": [3, 3, 2, 2]}}),
]


@pytest.mark.parametrize("command", EXAMPLES, ids=lambda c: type(c).__name__)
def test_every_command_round_trips_exactly(command):
    header, data = p.encode(command)
    assert header.dtype == torch.int64 and header.shape == (p.HEADER_LEN,)
    assert p.payload_size(header) == len(data)
    assert p.decode(header, data) == command


def test_every_command_class_has_an_example_and_a_unique_code():
    assert {type(c) for c in EXAMPLES} == set(p.COMMANDS.values())
    assert len({cls.OP for cls in p.COMMANDS.values()}) == len(p.COMMANDS)


def test_floats_keep_full_precision():
    cmd = p.Step(clip_coef=1 / 3, lrs=(2 ** -40, 1e300), skipped=False)
    assert p.decode(*p.encode(cmd)) == cmd


def test_too_many_learning_rates_is_refused_with_the_limit():
    with pytest.raises(ValueError, match="optimizer param groups"):
        p.encode(p.Step(clip_coef=1.0, lrs=(0.1,) * p.NUM_FLOATS, skipped=False))


def test_other_protocol_version_is_refused_naming_both_versions():
    header, data = p.encode(p.Stop())
    header[1] = p.PROTOCOL_VERSION + 1
    with pytest.raises(p.ProtocolError, match=f"version {p.PROTOCOL_VERSION + 1}.*version {p.PROTOCOL_VERSION}"):
        p.decode(header, data)


def test_garbage_header_is_refused():
    header, data = p.encode(p.Stop())
    header[0] = 7
    with pytest.raises(p.ProtocolError, match="malformed"):
        p.decode(header, data)
    header, data = p.encode(p.Stop())
    header[2] = 99
    with pytest.raises(p.ProtocolError, match="unknown command"):
        p.decode(header, data)
