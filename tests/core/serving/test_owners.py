"""core.serving.engine: one owner's sequences hold at most ``max_running_per_owner`` slots, and another
owner's sequence queued behind them is admitted first."""

from core.generation.generate import GenerationConfig, generate
from core.serving import Engine
from core.tokenizer import gpt2_tokenizer
from fused_models import tiny_model


def test_an_owner_past_its_running_limit_waits_while_another_owner_goes_ahead():
    model = tiny_model("gpt2", context_length=96)
    engine = Engine(model, gpt2_tokenizer(), max_batch=4, max_running_per_owner=2)
    cfg = GenerationConfig(max_new_tokens=6)
    alice = [engine.submit([5 + i, 6, 7], cfg, owner="alice") for i in range(4)]
    bob = engine.submit([9, 10, 11], cfg, owner="bob")
    engine.step()  # admission: two of alice's, then bob's, though two more of alice's came first
    assert [h.position for h in alice] == [None, None, 0, 1]
    assert bob.position is None
    while engine.step():
        pass
    answers = [[t for chunk in h for t in chunk.token_ids] for h in alice + [bob]]
    prompts = [[5 + i, 6, 7] for i in range(4)] + [[9, 10, 11]]
    assert answers == [generate(model, [p], cfg)[0] for p in prompts]  # held, not changed


def test_without_owners_admission_is_first_come_first_served():
    model = tiny_model("gpt2", context_length=96)
    engine = Engine(model, gpt2_tokenizer(), max_batch=2, max_running_per_owner=1)
    cfg = GenerationConfig(max_new_tokens=3)
    handles = [engine.submit([5, 6, i], cfg) for i in range(3)]
    engine.step()
    assert [h.position for h in handles] == [None, None, 0]
