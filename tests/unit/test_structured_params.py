"""StructuredOutputsParams' shape checks, the guided_decoding alias, and the torch bitmask against
xgrammar's own kernel (no model)."""

from __future__ import annotations

import pydantic
import pytest
import torch
import xgrammar as xgr

from labkit import GuidedDecodingParams, SamplingParams, StructuredOutputsParams
from labkit.engine.structured_output import apply_bitmask
from labkit.observe.attribution import CATEGORIES, PHASE_CATEGORY


def test_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one of .*got json, regex"):
        StructuredOutputsParams(json={"type": "object"}, regex="a+")
    with pytest.raises(ValueError, match="exactly one of .*got none"):
        StructuredOutputsParams()
    assert StructuredOutputsParams(json_object=True).kind == "json_object"
    with pytest.raises(ValueError, match="got none"):
        StructuredOutputsParams(json_object=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(json="{not json"), "json is not valid JSON"),
        (dict(json="[1, 2]"), "json must be a JSON schema"),
        (dict(json=42), "json must be a JSON schema"),
        (dict(choice=[]), "choice must be a non-empty list of strings"),
        (dict(choice=["a", 1]), "choice must be a non-empty list of strings"),
        (dict(regex=""), "regex must be a non-empty string"),
        (dict(grammar=None, structural_tag=" "), "structural_tag must be a non-empty string"),
        (dict(regex="a", whitespace_pattern=r"\s"), "whitespace_pattern is not supported"),
    ],
)
def test_malformed_constraints_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=f"^structured_outputs: {message}"):
        StructuredOutputsParams(**kwargs)


def test_json_schema_forms_and_the_cache_key():
    class User(pydantic.BaseModel):
        name: str
        age: int

    from_model = StructuredOutputsParams(json=User)
    assert from_model.json["properties"].keys() == {"name", "age"}
    text = '{"type": "object", "properties": {"b": {}, "a": {}}}'
    # Equal schemas share a key; property order is kept (it is the order of generation).
    assert (
        StructuredOutputsParams(json=text).spec
        == StructuredOutputsParams(json={"type": "object", "properties": {"b": {}, "a": {}}}).spec
    )
    assert StructuredOutputsParams(json=text).spec.index('"b"') < StructuredOutputsParams(
        json=text
    ).spec.index('"a"')


def test_sampling_params_take_either_name_and_dicts():
    legacy = SamplingParams(guided_decoding=GuidedDecodingParams(choice=["a", "b"]))
    assert legacy.structured_outputs.choice == ["a", "b"] and legacy.guided_decoding is None
    assert SamplingParams(structured_outputs={"regex": "x+"}).structured_outputs.regex == "x+"
    with pytest.raises(ValueError, match="^guided_decoding: give structured_outputs or"):
        SamplingParams(
            structured_outputs=StructuredOutputsParams(regex="a"),
            guided_decoding=GuidedDecodingParams(regex="b"),
        )
    with pytest.raises(ValueError, match="^structured_outputs: .*unexpected keyword"):
        SamplingParams(structured_outputs={"regexp": "x"})
    with pytest.raises(ValueError, match="backend='outlines' is not available"):
        GuidedDecodingParams(regex="a", backend="outlines")


@pytest.mark.parametrize("rows", [[0, 1, 2, 3, 4], [1, 3], [4]])
def test_torch_bitmask_matches_xgrammars_kernel(rows):
    gen = torch.Generator().manual_seed(0)
    vocab = 1000  # not a multiple of 32: the last word is partly padding
    bitmask = torch.randint(
        -(2**31), 2**31 - 1, (5, (vocab + 31) // 32), dtype=torch.int32, generator=gen
    )
    logits = torch.randn(5, vocab, generator=gen)
    ours, theirs = logits.clone(), logits.clone()
    apply_bitmask(ours, bitmask, rows)
    xgr.apply_token_bitmask_inplace(theirs, bitmask, indices=rows, backend="cpu")
    assert torch.equal(ours, theirs)
    untouched = [r for r in range(5) if r not in rows]
    assert torch.equal(ours[untouched], logits[untouched])


def test_mask_time_is_its_own_profile_category():
    assert PHASE_CATEGORY["structured"] == "structured output" in CATEGORIES


@pytest.mark.parametrize("bound", [{}, {"maxLength": 8}, {"minLength": 1, "maxLength": 8}])
def test_json_strings_refuse_raw_control_characters(bound):
    """A string refuses a raw tab, as JSON requires, with or without a length bound (xgrammar's
    own grammar for a length-bounded string lets one in); escapes and other text pass."""
    from labkit.engine.structured_output import _compile

    vocab = ['{"s":"', "a", "\t", "\\t", '"}', "</s>"]
    info = xgr.TokenizerInfo(vocab, stop_token_ids=[5])
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    schema = {"type": "object", "properties": {"s": {"type": "string", **bound}}, "required": ["s"]}
    grammar = _compile(compiler, StructuredOutputsParams(json=schema))

    def accepts(ids: list[int]) -> bool:
        matcher = xgr.GrammarMatcher(grammar)
        return all(matcher.accept_token(i) for i in ids)

    assert accepts([0, 1, 1, 4]) and not accepts([0, 1, 2])
    if "maxLength" not in bound:  # xgrammar's bounded strings take no escapes yet
        assert accepts([0, 1, 3, 4])
