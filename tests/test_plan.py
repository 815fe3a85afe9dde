"""The plan as a value: rules, fallbacks, the printed table, round trips, tied weights."""
import warnings

import pytest
import torch
from torch import nn

import adam_mini_tx as amx
from adam_mini_tx import blocks
from test_oracles import TinyLlama

HEADS = dict(n_heads=4, n_kv_heads=2)


def test_user_rules_win_over_structure():
    model = TinyLlama()
    plan = amx.plan_blocks(model, rules={"*.q_proj.weight": "elementwise",
                                         r"layers\.\d+\.mlp\.up_proj\.weight": "whole",
                                         "lm_head.weight": blocks.per_row((48, 32), transposed=True)},
                           **HEADS)
    assert plan["layers.0.self_attn.q_proj.weight"].layout == blocks.elementwise((32, 32))
    assert plan["layers.1.mlp.up_proj.weight"].num_blocks == 1
    assert plan["lm_head.weight"].num_blocks == 32
    assert plan["lm_head.weight"].source == "rule"
    assert plan["layers.0.self_attn.k_proj.weight"].num_blocks == 2


def test_conflicting_rules_name_the_parameter():
    with pytest.raises(ValueError, match=r"conflicting rules for parameter 'layers.0.self_attn.q_proj"):
        amx.plan_blocks(TinyLlama(), rules={"*q_proj*": "rows", "*.0.self_attn.*": "whole"}, **HEADS)


def test_impossible_rules_name_the_parameter():
    with pytest.raises(ValueError, match=r"rule for parameter 'norm.weight'"):
        amx.plan_blocks(TinyLlama(), rules={"norm.weight": "heads:5"}, **HEADS)
    with pytest.raises(ValueError, match=r"rule for parameter 'norm.weight'.*unknown layout"):
        amx.plan_blocks(TinyLlama(), rules={"norm.weight": "diagonal"}, **HEADS)
    with pytest.raises(ValueError, match=r"'norm.weight'.*layout for shape \(3, 3\)"):
        amx.plan_blocks(TinyLlama(), rules={"norm.weight": blocks.per_row((3, 3))}, **HEADS)


def test_rules_that_match_nothing_warn():
    with pytest.warns(UserWarning, match="matched no parameter"):
        amx.plan_blocks(TinyLlama(), rules={"*.nonexistent": "rows"}, **HEADS)


def test_unknown_parameters_fall_back_and_are_listed():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.mystery = nn.Parameter(torch.zeros(6, 5))
            self.scale = nn.Parameter(torch.ones(5))
            self.proj = nn.Linear(5, 7)

    plan = amx.plan_blocks(Odd())
    assert set(plan.fallbacks) == {"mystery", "scale"}
    assert plan["mystery"].num_blocks == 6 and plan["scale"].num_blocks == 1
    assert plan["proj.weight"].source == "structure"
    assert "fallbacks" in plan.table() and "mystery" in plan.table()
    lines = plan.fallback_lines()
    assert len(lines) == 2 and lines[0].startswith("mystery (6, 5): o i -> o, 6 blocks (")
    assert all(line in plan.table() for line in lines)
    with pytest.warns(UserWarning) as caught:  # the optimizer's one warning
        assert amx.warn_fallbacks(plan) is True
    assert len(caught) == 1 and caught[0].filename == __file__
    assert all(line in str(caught[0].message) for line in lines)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert amx.warn_fallbacks(amx.plan_blocks(nn.Linear(5, 7))) is False


def test_table_lists_every_parameter_and_totals():
    plan = amx.plan_blocks(TinyLlama(), **HEADS)
    table = str(plan)
    for name in plan:
        assert name in table
    assert "(h d) i -> h [h=2]" in table
    assert f"second-moment values: {plan.num_blocks:,}" in table
    assert "vs AdamW" in table


def test_to_dict_round_trips_exactly():
    plan = amx.plan_blocks(TinyLlama(), **HEADS)
    again = amx.BlockPlan.from_dict(plan.to_dict())
    assert again.layouts() == plan.layouts()
    assert again.to_dict() == plan.to_dict()


def test_malformed_plan_dict_names_the_parameter():
    data = amx.plan_blocks(TinyLlama(), **HEADS).to_dict()
    data["norm.weight"]["runs"] = [[1, 7]]
    with pytest.raises(ValueError, match="'norm.weight' is malformed"):
        amx.BlockPlan.from_dict(data)


def test_tied_weights_appear_once():
    model = TinyLlama()
    model.lm_head.weight = model.embed_tokens.weight
    plan = amx.plan_blocks(model, **HEADS)
    assert "embed_tokens.weight" in plan and "lm_head.weight" not in plan


def test_frozen_parameters_are_not_planned():
    model = TinyLlama()
    model.embed_tokens.weight.requires_grad_(False)
    assert "embed_tokens.weight" not in amx.plan_blocks(model, **HEADS)


def test_unnamed_parameters_are_a_clear_error():
    with pytest.raises(TypeError, match="named_parameters"):
        amx.plan_blocks(list(TinyLlama().parameters()))


def test_names_alone_do_not_confuse_network_with_wo():
    params = {"network.weight": torch.zeros(4, 3), "encoder.lnx.weight": torch.zeros(3)}
    plan = amx.plan_blocks(params)
    assert plan["network.weight"].role == "linear" and plan["network.weight"].source == "fallback"
