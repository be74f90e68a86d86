"""Tests for opcd.data.batching: padding helpers on hand-written cases, and the key property that a
left-padded [prompt | response] batch gives every row the logits it would get alone."""

import pytest
import torch

from opcd.data.batching import (
    left_pad,
    pack,
    plan_micro_batches,
    position_ids,
    prompt_response_inputs,
    right_pad,
    strip_after_eos,
)
from opcd.workers.lm_head import hidden_states_out, response_hidden_states
from opcd.models import load_causal_lm
from opcd.workers.distributed import rank_micro_batches

PAD, EOS = 0, 2


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8], []], pad_id=PAD)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[True, True, True], [False, False, True], [False, False, False]]
    assert ids.dtype == torch.long and mask.dtype == torch.bool


def test_right_pad_with_and_without_width():
    ids, mask = right_pad([[5, 6], [7]], pad_id=9)
    assert ids.tolist() == [[5, 6], [7, 9]]
    assert mask.tolist() == [[True, True], [True, False]]
    ids, mask = right_pad([[5, 6], [7]], pad_id=9, width=4)
    assert ids.tolist() == [[5, 6, 9, 9], [7, 9, 9, 9]]
    assert mask.tolist() == [[True, True, False, False], [True, False, False, False]]


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 2, 2]]


def test_strip_after_eos_keeps_the_eos_and_pads_everything_after():
    rows = torch.tensor([
        [11, 12, EOS, 13, EOS],  # EOS mid-row: kept and trained on; the rest is pad and masked
        [EOS, 14, 15, 16, 17],  # EOS first
        [18, 19, 20, 21, 22],  # no EOS: everything kept
        [23, 24, 25, 26, EOS],  # EOS last
    ])
    ids, mask = strip_after_eos(rows, {EOS}, pad_id=PAD)
    assert ids.tolist() == [[11, 12, EOS, 0, 0], [EOS, 0, 0, 0, 0], [18, 19, 20, 21, 22], [23, 24, 25, 26, EOS]]
    assert mask.tolist() == [[True, True, True, False, False], [True, False, False, False, False],
                             [True] * 5, [True] * 5]


def test_strip_after_eos_with_several_stop_ids_stops_at_the_first():
    rows = torch.tensor([[5, 7, 3, 7], [5, 5, 5, 5]])
    ids, mask = strip_after_eos(rows, {3, 7}, pad_id=PAD)
    assert ids.tolist() == [[5, 7, 0, 0], [5, 5, 5, 5]]
    assert mask.tolist() == [[True, True, False, False], [True] * 4]


def test_strip_after_eos_when_pad_is_the_eos():
    """SmolLM2's pad token is its EOS: padding the model emitted after the EOS must not be kept."""
    rows = torch.tensor([[4, EOS, EOS, EOS], [4, 5, 6, EOS]])
    ids, mask = strip_after_eos(rows, {EOS}, pad_id=EOS)
    assert ids.tolist() == [[4, EOS, EOS, EOS], [4, 5, 6, EOS]]
    assert mask.tolist() == [[True, True, False, False], [True] * 4]


def test_prompt_response_inputs_layout():
    response_ids, response_mask = right_pad([[21, 22, EOS], [23]], pad_id=PAD)
    inputs = prompt_response_inputs([[5, 6], [7, 8, 9, 10]], response_ids, response_mask, pad_id=PAD)
    assert inputs["input_ids"].tolist() == [[0, 0, 5, 6, 21, 22, EOS], [7, 8, 9, 10, 23, 0, 0]]
    assert inputs["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]
    assert inputs["position_ids"].tolist() == [[0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 4, 4]]


def test_micro_batches_by_count_cover_every_row_once_in_order():
    assert plan_micro_batches([0, 1, 2, 3, 4], [9] * 5, size=2) == [[0, 1], [2, 3], [4]]
    assert plan_micro_batches([1, 3], [9] * 4, size=8) == [[1, 3]]
    assert plan_micro_batches([], [], size=2) == []


def test_micro_batches_by_token_budget():
    lengths = [5, 3, 4, 20, 1, 1]
    # consecutive rows while they fit; a row over the budget is a micro-batch of its own
    assert plan_micro_batches(list(range(6)), lengths, size=1, token_budget=8) == [[0, 1], [2], [3], [4, 5]]
    assert plan_micro_batches([0, 2, 4], lengths, size=1, token_budget=100) == [[0, 2, 4]]


def test_padded_micro_batches_count_every_row_at_the_longest_length():
    """Rows padded to the longest: 4 + 1 + 1 + 1 = 7 tokens packed, but 4 x 4 = 16 padded."""
    lengths = [4, 1, 1, 1]
    assert plan_micro_batches(list(range(4)), lengths, size=1, token_budget=8) == [[0, 1, 2, 3]]
    assert plan_micro_batches(list(range(4)), lengths, size=1, token_budget=8, padded=True) == [[0, 1], [2, 3]]
    # a long row after short ones: the group's cost jumps to the long row's length x rows
    assert plan_micro_batches([1, 2, 0], lengths, size=1, token_budget=8, padded=True) == [[1, 2], [0]]
    assert plan_micro_batches(list(range(4)), lengths, size=3, padded=True) == [[0, 1, 2], [3]]  # counts only


def test_every_rank_runs_the_busiest_ranks_number_of_passes():
    lengths = [10, 1, 10, 1, 10, 1]

    def plan(indices):
        return plan_micro_batches(indices, lengths, size=8, token_budget=10)

    # rank 0 holds 0, 2, 4 (one per pass: 3 passes); rank 1 holds 1, 3, 5 (all in one pass)
    assert rank_micro_batches(6, 0, 2, plan) == ([[0], [2], [4]], 3)
    assert rank_micro_batches(6, 1, 2, plan) == ([[1, 3, 5]], 3)
    assert rank_micro_batches(1, 1, 2, plan) == ([], 1)  # an idle rank still joins one pass


def test_pack_layout():
    response_ids, response_mask = right_pad([[21, 22, EOS], [23]], pad_id=PAD)
    row = pack([[5, 6], [7, 8, 9, 10]], response_ids, response_mask)
    assert row.input_ids.tolist() == [[5, 6, 21, 22, EOS, 7, 8, 9, 10, 23]]
    assert row.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]
    # the hidden state at column c predicts the token at column c + 1
    assert row.response_index.tolist() == [[1, 2, 3], [8, 0, 0]]
    with pytest.raises(ValueError, match="empty prompt"):
        pack([[], [7]], response_ids, response_mask)
    with pytest.raises(ValueError, match="not right-padded"):
        pack([[5], [7]], response_ids, torch.tensor([[True, False, True], [True, False, False]]))


@pytest.fixture(scope="module")
def tiny_lm(tiny_model):
    return load_causal_lm(str(tiny_model)).eval()


def test_padded_batch_logits_equal_each_row_alone(tiny_lm):
    """The contract both workers rely on: with logits_to_keep=T+1, logits[:, :-1] of a left-padded
    batch are, for every row, the logits of that row run alone without padding (so padding changes
    neither positions nor attention)."""
    generator = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(10, 40000, (n,), generator=generator).tolist()

    prompts = [tokens(9), tokens(2), tokens(5), tokens(1)]
    responses = [tokens(4) + [EOS], tokens(6), tokens(1), tokens(3)]
    response_ids, response_mask = right_pad(responses, pad_id=EOS)
    inputs = prompt_response_inputs(prompts, response_ids, response_mask, pad_id=EOS)
    width = response_ids.shape[1]
    with torch.no_grad():
        batched = tiny_lm(**inputs, logits_to_keep=width + 1).logits[:, :-1]  # [B, T, V]
        assert batched.shape[:2] == (4, width)
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            alone = tiny_lm(input_ids=torch.tensor([prompt + response])).logits[0]  # [P + T_row, V]
            expected = alone[len(prompt) - 1:len(prompt) - 1 + len(response)]  # predicts each response token
            torch.testing.assert_close(batched[row, :len(response)], expected, atol=1e-4, rtol=0)


def test_padded_batch_is_not_trivially_equal(tiny_lm):
    """Sanity for the test above: attending to the padding does change the logits, so the equality
    there really checks the masking (RoPE is shift-invariant, so positions alone would not show it)."""
    prompts = [[100, 200, 300, 400, 500], [600]]
    response_ids, response_mask = right_pad([[700, 800], [900, 1000]], pad_id=EOS)
    inputs = prompt_response_inputs(prompts, response_ids, response_mask, pad_id=EOS)
    with torch.no_grad():
        masked = tiny_lm(**inputs, logits_to_keep=3).logits[1, :-1]
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
        unmasked = tiny_lm(**inputs, logits_to_keep=3).logits[1, :-1]
        alone = tiny_lm(input_ids=torch.tensor([[600, 900, 1000]])).logits[0, 0:2]
    torch.testing.assert_close(masked, alone, atol=1e-4, rtol=0)
    assert (unmasked - alone).abs().max() > 1e-3


def test_packed_row_hidden_states_equal_each_row_alone(tiny_lm):
    """Padding-free packing: one row, position ids restarting per sequence and no attention mask make
    transformers keep every sequence to itself; the hidden states predicting each response token
    equal those of the padded batch (and so of the row alone, by the test above)."""
    generator = torch.Generator().manual_seed(1)

    def tokens(n):
        return torch.randint(10, 40000, (n,), generator=generator).tolist()

    prompts = [tokens(9), tokens(1), tokens(5), tokens(2)]
    response_ids, response_mask = right_pad([tokens(4), tokens(6), tokens(1), tokens(1)], pad_id=EOS)
    with torch.no_grad():
        packed = response_hidden_states(tiny_lm, prompts, response_ids, response_mask, EOS, packed=True)
        padded = response_hidden_states(tiny_lm, prompts, response_ids, response_mask, EOS, packed=False)
    assert packed.shape == padded.shape == (4, 6, tiny_lm.config.hidden_size)
    torch.testing.assert_close(packed[response_mask], padded[response_mask], atol=1e-5, rtol=0)
    # and not by accident: without the restart of the position ids, sequences would see each other
    row = pack(prompts, response_ids, response_mask)
    with torch.no_grad(), hidden_states_out(tiny_lm):
        leaky = tiny_lm(input_ids=row.input_ids, use_cache=False).logits[0][row.response_index]
    assert (leaky[response_mask] - padded[response_mask]).abs().max() > 1e-3
