"""core.serving.engine: sequences decoded together answer as each would alone, whoever joins, leaves or waits."""

import asyncio
import contextlib
import copy
import threading

import pytest
import torch

from core.fast.cuda_graphs import GraphedDecoder
from core.fast.prefix_cache import PrefixCache
from core.fast.serving import ServingDecoder
from core.fast.speculative import ModelDraft
from core.generation.generate import ContextLengthError, GenerationConfig, generate, stream
from core.model import KVCache
from core.serving import Engine, EngineFull, EngineStopped, Queued
from core.tokenizer import gpt2_tokenizer
from fused_models import tiny_model

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15, 16, 17, 18, 19, 20], list(range(30, 61))]
GREEDY = GenerationConfig(max_new_tokens=12)


@pytest.fixture(scope="module")
def tokenizer():
    # Our tiny models' ids (below 97) are printable ASCII characters in GPT-2's vocabulary.
    return gpt2_tokenizer()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return tiny_model(request.param, context_length=96)


def alone(model, prompt, cfg=GREEDY):
    return generate(model, [prompt], cfg)[0]


def tokens(handle, stops=()):
    """The new token ids a handle streamed, without a stop token (as ``generate`` returns them)."""
    return [t for chunk in handle for t in chunk.token_ids if t not in stops]


def run(engine) -> int:
    steps = 0
    while engine.step():
        steps += 1
    return steps


def test_sequences_decoded_together_give_each_the_tokens_and_logits_it_gets_alone(model, tokenizer):
    # The oldest prompt is prefilled alone, the three after it in one pass, right-padded to the
    # longest (8, 7 and 6 tokens), then every decoding step is one pass over all four rows.
    prompts = [PROMPTS[0], list(range(20, 28)), list(range(40, 47)), list(range(60, 66))]
    # Logits from the final norm's output, which every pass goes through once per sampled token.
    seen: list[torch.Tensor] = []
    hook = model.final_norm.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    try:
        expected, expected_hidden = [], []
        for prompt in prompts:
            seen.clear()
            expected.append(alone(model, prompt))
            expected_hidden.append(torch.cat([h[:, -1] for h in seen]))  # (tokens, d)
        seen.clear()
        engine = Engine(model, tokenizer, max_batch=len(prompts))
        handles = [engine.submit(p, GREEDY) for p in prompts]
        run(engine)
    finally:
        hook.remove()
    assert [tokens(h) for h in handles] == expected
    assert [h.shape[0] for h in seen] == [1, 3] + [4] * (GREEDY.max_new_tokens - 1)
    prefilled = torch.cat([h[:, -1] for h in seen[:2]])  # (4, d)
    decoded = torch.stack([h[:, -1] for h in seen[2:]], dim=1)  # (4, steps, d)
    for row in range(len(prompts)):
        got = torch.cat([prefilled[row : row + 1], decoded[row]])
        head = model.head_weight
        torch.testing.assert_close(got @ head.T, expected_hidden[row] @ head.T, rtol=1e-4, atol=1e-4)


def test_a_sequence_admitted_mid_flight_leaves_the_others_unchanged(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4)
    first = [engine.submit(p, GREEDY) for p in PROMPTS[:2]]
    for _ in range(4):
        engine.step()
    late = engine.submit(PROMPTS[2], GREEDY)
    run(engine)
    assert [tokens(h) for h in first + [late]] == [alone(model, p) for p in PROMPTS[:3]]


def assert_kept_rows_are_a_fresh_prefill(model, store, tokens):
    """The keys and values the engine stored for ``tokens`` (a retired sequence's prompt and answer)
    equal a fresh pass of the model over them. Our tiny random models' greedy answers mostly repeat
    the prompt's last token whatever came before, so equal tokens alone would not show rows that went
    missing between pages and a lone sequence's own cache."""
    kept = store.take(model, tokens + [0], 1)  # the whole stored conversation, taken over
    assert kept.length == len(tokens) - 1  # the answer's last token is never fed back
    fresh = KVCache(model.cfg, 1, len(tokens))
    model(torch.tensor([tokens[: kept.length]]), cache=fresh)
    n = kept.length
    torch.testing.assert_close(kept.keys[:, :, :, :n], fresh.keys[:, :, :, :n], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kept.values[:, :, :, :n], fresh.values[:, :, :, :n], rtol=1e-4, atol=1e-4)


def test_a_lone_sequence_moves_into_its_pages_when_another_joins_and_out_when_it_leaves(model, tokenizer):
    store = PrefixCache()
    engine = Engine(model, tokenizer, max_batch=4, prefix_cache=store)
    lone = engine.submit(PROMPTS[3], GenerationConfig(max_new_tokens=20))
    for _ in range(3):
        engine.step()  # alone: its own cache, the model's ordinary forward
    short = engine.submit(PROMPTS[1], GenerationConfig(max_new_tokens=4))
    while not short.done:
        engine.step()  # together: both in pages, one batched pass
    run(engine)  # alone again
    got = tokens(lone)
    assert [got, tokens(short)] == [alone(model, PROMPTS[3], GenerationConfig(max_new_tokens=20)),
                                    alone(model, PROMPTS[1], GenerationConfig(max_new_tokens=4))]
    assert engine.pages_used == 0
    follow_up = PROMPTS[3] + got + [40, 41, 42]  # the next turn, alone: the kept rows are its own cache
    again = engine.submit(follow_up, GenerationConfig(max_new_tokens=8))
    run(engine)
    assert again.cached_prompt_tokens == len(PROMPTS[3]) + len(got) - 1
    answer = tokens(again)
    assert answer == alone(model, follow_up, GenerationConfig(max_new_tokens=8))
    assert_kept_rows_are_a_fresh_prefill(model, store, follow_up + answer)


def test_a_sequence_cancelled_mid_flight_leaves_the_others_unchanged(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4)
    handles = [engine.submit(p, GREEDY) for p in PROMPTS[:3]]
    for _ in range(4):
        engine.step()
    handles[1].cancel()
    run(engine)
    assert [tokens(handles[i]) for i in (0, 2)] == [alone(model, PROMPTS[i]) for i in (0, 2)]
    cut = tokens(handles[1])
    assert handles[1].finish_reason == "cancelled" and 0 < len(cut) < GREEDY.max_new_tokens
    assert cut == alone(model, PROMPTS[1])[: len(cut)]
    assert engine.stats.cancelled == 1 and engine.stats.finished == 2 and engine.stats.running == 0


def test_a_stop_string_ends_one_sequence_as_stream_does_and_leaves_the_others_unchanged(model, tokenizer):
    answer = tokenizer.decode(alone(model, PROMPTS[1]))
    stopping = GenerationConfig(max_new_tokens=12, stop_strings=(answer[4:6],))
    expected = list(stream(model, tokenizer, PROMPTS[1], stopping))
    engine = Engine(model, tokenizer, max_batch=4)
    handles = [engine.submit(PROMPTS[0], GREEDY), engine.submit(PROMPTS[1], stopping), engine.submit(PROMPTS[2], GREEDY)]
    run(engine)
    got = list(handles[1])
    assert [(c.text, c.token_ids, c.finish_reason) for c in got] == [
        (c.text, c.token_ids, c.finish_reason) for c in expected]
    assert got[-1].finish_reason == "stop" and handles[1].completion_tokens < 12
    assert [tokens(handles[i]) for i in (0, 2)] == [alone(model, PROMPTS[i]) for i in (0, 2)]


def test_a_stop_token_ends_one_sequence_and_not_the_others(model, tokenizer):
    stop = alone(model, PROMPTS[0])[3]
    stopping = GenerationConfig(max_new_tokens=12, stop_token_ids=(stop,))
    engine = Engine(model, tokenizer, max_batch=4)
    handles = [engine.submit(PROMPTS[0], stopping), engine.submit(PROMPTS[2], GREEDY)]
    run(engine)
    assert tokens(handles[0], stops=(stop,)) == alone(model, PROMPTS[0], stopping)
    assert handles[0].finish_reason == "stop"
    assert tokens(handles[1]) == alone(model, PROMPTS[2])


def test_each_sequence_samples_with_its_own_settings_and_seed(model, tokenizer):
    configs = [
        GenerationConfig(max_new_tokens=12, temperature=1.0, seed=7),
        GenerationConfig(max_new_tokens=12),
        GenerationConfig(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=11),
        GenerationConfig(max_new_tokens=12, temperature=1.3, top_p=0.7, seed=7),
    ]
    engine = Engine(model, tokenizer, max_batch=4)
    handles = [engine.submit(p, c) for p, c in zip(PROMPTS, configs)]
    run(engine)
    got = [tokens(h) for h in handles]
    assert got == [alone(model, p, c) for p, c in zip(PROMPTS, configs)]
    # The same seeded request again, now beside other company: the same tokens.
    again = Engine(model, tokenizer, max_batch=2)
    handles = [again.submit(PROMPTS[3], GREEDY), again.submit(PROMPTS[0], configs[0])]
    run(again)
    assert tokens(handles[1]) == got[0]
    other_seed = Engine(model, tokenizer)
    handle = other_seed.submit(PROMPTS[0], GenerationConfig(max_new_tokens=12, temperature=1.0, seed=8))
    run(other_seed)
    assert tokens(handle) != got[0]


def test_the_queue_waits_for_a_free_place_and_tells_each_sequence_its_place(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2)
    handles = [engine.submit(p, GREEDY) for p in PROMPTS]
    assert [h.position for h in handles] == [0, 1, 2, 3]
    assert engine.stats.waiting == 4
    engine.step()
    assert [h.position for h in handles] == [None, None, 0, 1]
    assert (engine.stats.running, engine.stats.waiting) == (2, 2)
    assert handles[2].completion_tokens == 0  # no place, no token
    run(engine)
    events = [list(h.events()) for h in handles]
    assert [[e.ahead for e in got if isinstance(e, Queued)] for got in events] == [[0], [1], [2, 0], [3, 1]]
    assert [[t for e in got if not isinstance(e, Queued) for t in e.token_ids] for got in events] == [
        alone(model, p) for p in PROMPTS]


def test_prompts_longer_than_the_prefill_chunk_give_the_same_tokens_without_freezing_the_others(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4, prefill_chunk=4)
    short = engine.submit(PROMPTS[1], GREEDY)
    engine.step()  # its prompt, then its first decoding step: two tokens
    long = engine.submit(PROMPTS[3], GREEDY)  # 31 tokens: eight steps of prefill
    steps = 0
    while long.completion_tokens == 0:
        before = short.completion_tokens
        engine.step()
        steps += 1
        assert short.completion_tokens == before + 1  # a token every step meanwhile
    assert steps == 8
    run(engine)
    assert [tokens(short), tokens(long)] == [alone(model, PROMPTS[1]), alone(model, PROMPTS[3])]
    assert engine.stats.prefilled_tokens == len(PROMPTS[1]) + len(PROMPTS[3])
    lone = engine.submit(PROMPTS[3], GREEDY)
    engine.step()  # nobody else to keep waiting: the whole prompt in one step
    assert lone.completion_tokens == 2


def test_a_conversation_kept_in_the_prefix_cache_is_copied_into_its_slot(model, tokenizer):
    store = PrefixCache()
    engine = Engine(model, tokenizer, max_batch=2, prefix_cache=store)
    first = engine.submit(PROMPTS[3], GREEDY)
    run(engine)
    answer = tokens(first)
    follow_up = PROMPTS[3] + answer + [40, 41, 42]
    handles = [engine.submit(follow_up, GREEDY), engine.submit(PROMPTS[0], GREEDY)]
    run(engine)
    # The first answer's last token was never run through the model, so its keys are not kept.
    assert handles[0].cached_prompt_tokens == len(PROMPTS[3]) + len(answer) - 1
    assert engine.stats.prefilled_tokens == len(PROMPTS[3]) + 4 + len(PROMPTS[0])
    assert [tokens(h) for h in handles] == [alone(model, follow_up), alone(model, PROMPTS[0])]


def test_prompts_arriving_together_run_their_shared_start_once(model, tokenizer):
    preamble = list(range(40, 60))  # a chat template's preamble, longer than the prefix cache's MIN_REUSE
    prompts = [preamble + [5, 6, 7], preamble + [8, 9], preamble + [10, 11, 12, 13]]
    engine = Engine(model, tokenizer, max_batch=3, prefix_cache=PrefixCache())
    handles = [engine.submit(p, GREEDY) for p in prompts]
    run(engine)
    assert [h.cached_prompt_tokens for h in handles] == [0, len(preamble), len(preamble)]
    assert engine.stats.prefilled_tokens == len(prompts[0]) + 2 + 4
    assert [tokens(h) for h in handles] == [alone(model, p) for p in prompts]


def test_prompts_whose_start_is_kept_already_start_in_one_pass(model, tokenizer):
    preamble = list(range(40, 60))
    engine = Engine(model, tokenizer, max_batch=3, prefix_cache=PrefixCache())
    engine.submit(preamble + [4], GREEDY)
    run(engine)  # the preamble is kept from here on
    prompts = [preamble + [5, 6, 7], preamble + [8, 9, 10], preamble + [11, 12]]
    passes = []
    engine._pass = lambda seqs, *rest, _run=engine._pass: passes.append(len(seqs)) or _run(seqs, *rest)
    handles = [engine.submit(p, GREEDY) for p in prompts]
    engine.step()
    # One prefill pass of all three (then one decoding step of all three), not the oldest alone first.
    assert passes == [3, 3]
    run(engine)
    assert [h.cached_prompt_tokens for h in handles] == [len(preamble)] * 3
    assert [tokens(h) for h in handles] == [alone(model, p) for p in prompts]


def test_an_answer_that_outgrows_max_len_ends_with_length(model, tokenizer):
    engine = Engine(model, tokenizer, max_len=20)
    prompt = list(range(40, 55))  # 15 tokens: room for 5 more positions, so 6 new tokens
    handle = engine.submit(prompt, GenerationConfig(max_new_tokens=50))
    run(engine)
    assert tokens(handle) == alone(model, prompt)[:6]
    assert handle.finish_reason == "length"


def per_position(model) -> int:
    """Bytes of keys and values per position: 2 layers of 2 key/value heads of 8 floats (llama), 4 (gpt2)."""
    return 2 * 2 * (4 if model.cfg.family == "gpt2" else 2) * 8 * 4


def paged(model, tokenizer, pages, page_size=4, **kwargs):
    return Engine(model, tokenizer, max_kv_bytes=pages * page_size * per_position(model), page_size=page_size, **kwargs)


def test_a_memory_budget_sets_the_pages_and_the_longest_sequence(model, tokenizer):
    engine = paged(model, tokenizer, pages=5, page_size=16)
    assert (engine.max_len, engine.kv_bytes, engine.pages_used) == (80, 5 * 16 * per_position(model), 0)
    assert Engine(model, tokenizer, max_kv_bytes=10**9).max_len == model.cfg.context_length
    with pytest.raises(ValueError, match="holds not one page"):
        Engine(model, tokenizer, page_size=16, max_kv_bytes=16 * per_position(model) - 1)


def test_the_pages_in_use_are_given_back_and_those_touched_stay_counted(model, tokenizer):
    engine = paged(model, tokenizer, pages=6, page_size=4)
    page = 4 * per_position(model)
    assert (engine.kv_bytes_in_use, engine.kv_bytes_touched) == (0, page)  # page 0, zeroed for padding
    handle = engine.submit(PROMPTS[0][:6], GenerationConfig(max_new_tokens=6))  # 6 + 6 positions
    engine.step()
    assert engine.kv_bytes_in_use == engine.kv_bytes_touched == 2 * page  # 7 positions so far
    run(engine)
    assert handle.done and engine.kv_bytes_in_use == 0
    assert engine.kv_bytes_touched == 3 * page  # given back, still resident: the next answers reuse them
    again = engine.submit(PROMPTS[1][:6], GenerationConfig(max_new_tokens=6))
    run(engine)
    assert again.done and engine.kv_bytes_touched == 3 * page
    with pytest.raises(ValueError, match="page_size"):
        Engine(model, tokenizer, page_size=0)


def test_sequences_take_pages_as_they_grow_and_give_them_back_on_finish_and_cancel(model, tokenizer):
    engine = paged(model, tokenizer, pages=24)
    kept, cut = engine.submit(PROMPTS[0], GREEDY), engine.submit(PROMPTS[3], GREEDY)
    seen = set()
    while engine.step():
        # Every position fed back holds keys and values: the prompt and all new tokens but the last.
        held = [len(p) + h.completion_tokens - 1 for p, h in ((PROMPTS[0], kept), (PROMPTS[3], cut)) if not h.done]
        assert engine.pages_used == sum(-(-n // 4) for n in held)
        seen.add(engine.pages_used)
        if cut.completion_tokens == 3:
            cut.cancel()
    assert len(seen) > 2 and engine.pages_used == 0
    assert cut.finish_reason == "cancelled" and tokens(kept) == alone(model, PROMPTS[0])


def test_a_sequence_waits_while_pages_run_out_and_is_admitted_when_they_come_back(model, tokenizer):
    engine = paged(model, tokenizer, pages=6)  # 24 positions
    first, second = list(range(40, 56)), list(range(60, 72))  # 4 pages, 3 more: not both at once
    handles = [engine.submit(first, GREEDY), engine.submit(second, GREEDY)]
    engine.step()
    assert engine.stats.running == 1 and handles[1].position == 0 and handles[1].completion_tokens == 0
    while not handles[0].done:
        assert handles[1].completion_tokens == 0
        engine.step()
    run(engine)
    assert handles[0].finish_reason == "length"  # 16 + 9 new tokens fill 24 positions (the last is not fed back)
    assert [tokens(h) for h in handles] == [alone(model, first)[:9], alone(model, second)]
    assert engine.stats.preempted == 0 and engine.pages_used == 0


@pytest.mark.parametrize("keep", [False, True], ids=["recomputed", "copied back"])
def test_a_sequence_preempted_for_an_older_ones_pages_resumes_with_the_tokens_it_gets_alone(model, tokenizer, keep):
    # Each grows to 25 positions (7 pages): both together outgrow 10 pages at 20 positions each,
    # and the younger waits again, its keys and values run again (or copied back from the prefix
    # cache, which keeps 16 positions or more) once pages are free.
    store = PrefixCache() if keep else None
    engine = paged(model, tokenizer, pages=10, prefix_cache=store)
    prompts = [list(range(20, 34)), list(range(60, 74))]
    handles = [engine.submit(p, GREEDY) for p in prompts]
    run(engine)
    assert engine.stats.preempted >= 1 and engine.pages_used == 0
    events = list(handles[1].events())
    assert [e.ahead for e in events if isinstance(e, Queued)] == [1]  # no place shown once its answer started
    got = [tokens(handles[0]), [t for e in events if not isinstance(e, Queued) for t in e.token_ids]]
    assert got == [alone(model, p) for p in prompts]
    assert (engine.stats.cached_tokens > 0) == keep
    if keep:
        for prompt, answer in zip(prompts, got):
            assert_kept_rows_are_a_fresh_prefill(model, store, prompt + answer)


def test_zero_new_tokens_finish_at_once(model, tokenizer):
    engine = Engine(model, tokenizer)
    handle = engine.submit(PROMPTS[0], GenerationConfig(max_new_tokens=0))
    assert handle.done and [c.finish_reason for c in handle] == ["length"]


def test_the_engine_thread_serves_a_thread_and_asyncio_and_a_reader_that_leaves_cancels(model, tokenizer):
    observed: list[str] = []
    engine = Engine(model, tokenizer, max_batch=4, on_observe=lambda name, value: observed.append(name))
    with engine:
        from_thread: list[list[int]] = []
        threaded = engine.submit(PROMPTS[0], GREEDY)
        reader = threading.Thread(target=lambda: from_thread.append(tokens(threaded)))
        reader.start()

        async def read_async() -> tuple[list[int], str]:
            handle = engine.submit(PROMPTS[2], GREEDY)
            got = [t async for chunk in handle for t in chunk.token_ids]
            leaving = engine.submit(PROMPTS[3], GenerationConfig(max_new_tokens=200))
            async with contextlib.aclosing(aiter(leaving)) as chunks:
                async for _ in chunks:
                    break  # the client went away after one chunk

            async def retired() -> None:
                while not leaving.done:
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(retired(), 30)
            return got, leaving.finish_reason

        from_asyncio, reason = asyncio.run(read_async())
        reader.join(30)
        assert engine.call(lambda: "between steps").result(30) == "between steps"
    assert from_thread == [alone(model, PROMPTS[0])]
    assert from_asyncio == alone(model, PROMPTS[2])
    assert reason == "cancelled"
    assert observed.count("ttft_seconds") == observed.count("queue_seconds") == 3
    assert "batch_size" in observed and "tbt_seconds" in observed
    with pytest.raises(EngineStopped):
        engine.submit(PROMPTS[0], GREEDY)


def test_stopping_ends_what_is_left_with_an_error(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1)
    running, waiting = engine.submit(PROMPTS[0], GREEDY), engine.submit(PROMPTS[1], GREEDY)
    engine.step()
    engine.stop()
    for handle in (running, waiting):
        with pytest.raises(EngineStopped):
            list(handle)


def test_bad_requests_and_settings_get_clear_errors(model, tokenizer):
    engine = Engine(model, tokenizer, max_len=32, max_waiting=1)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], GREEDY)
    with pytest.raises(ContextLengthError, match="context window is 32"):
        engine.submit(list(range(33)), GREEDY)
    with pytest.raises(ValueError, match="vocabulary of 97"):
        engine.submit([5, 97], GREEDY)
    engine.submit(PROMPTS[0], GREEDY)
    with pytest.raises(EngineFull, match="1 sequences are waiting"):
        engine.submit(PROMPTS[1], GREEDY)
    assert (engine.stats.submitted, engine.stats.rejected) == (1, 1)
    for bad, match in ((dict(max_batch=0), "max_batch"), (dict(max_len=97), "max_len"),
                       (dict(prefill_chunk=0), "prefill_chunk"), (dict(max_waiting=-1), "max_waiting")):
        with pytest.raises(ValueError, match=match):
            Engine(model, tokenizer, **bad)


# -- a sequence running alone decodes by the serving decoder's strategy for one sequence -----------


def drafted(model, draft_model=None) -> ServingDecoder:
    """A serving decoder drafting with ``draft_model`` (default: the model itself, every guess its own)."""
    decoder = ServingDecoder(model)
    decoder.draft = ModelDraft(draft_model if draft_model is not None else model)
    return decoder


def test_a_lone_greedy_sequence_decodes_speculatively_with_the_decoders_draft_and_its_own_tokens(model, tokenizer):
    decoder = drafted(model)
    engine = Engine(decoder, tokenizer)
    cfg = GenerationConfig(max_new_tokens=30)
    handle = engine.submit(PROMPTS[0], cfg)
    run(engine)
    assert tokens(handle) == alone(model, PROMPTS[0], cfg)
    counts = decoder.draft.counts
    assert counts["accepted"] == counts["drafted"] > 0  # the model's own guesses: every one kept
    # The prompt's pass gives the first token, then verifying passes of 8, 8, 8 and the last 5.
    assert engine.stats.steps == counts["passes"] == 4


def test_a_sequence_admitted_beside_a_speculating_one_switches_both_to_batched_steps(model, tokenizer):
    store = PrefixCache()
    decoder = drafted(model)
    engine = Engine(decoder, tokenizer, max_batch=4, prefix_cache=store)
    long_cfg, short_cfg = GenerationConfig(max_new_tokens=40), GenerationConfig(max_new_tokens=4)
    lone = engine.submit(PROMPTS[3], long_cfg)
    engine.step()
    engine.step()
    assert lone.completion_tokens == 17 and decoder.draft.counts["passes"] == 2  # 1 + 8 + 8
    short = engine.submit(PROMPTS[1], short_cfg)
    steps = engine.stats.steps
    while not short.done:
        engine.step()  # together: one batched pass a step, one token each, the draft idle
    assert decoder.draft.counts["passes"] == 2
    assert lone.completion_tokens == 17 + engine.stats.steps - steps
    run(engine)  # alone again: drafting again, from the rows that came back out of its pages
    assert decoder.draft.counts["passes"] > 2
    got = tokens(lone)
    assert [got, tokens(short)] == [alone(model, PROMPTS[3], long_cfg), alone(model, PROMPTS[1], short_cfg)]
    assert engine.pages_used == 0
    assert_kept_rows_are_a_fresh_prefill(model, store, PROMPTS[3] + got)


def test_guesses_the_model_rejects_change_no_token_and_no_row(model, tokenizer):
    # A draft of other weights: most guesses are refused, and the refused guesses' keys and values,
    # written past the kept ones, must neither be read nor move into the pages when another joins.
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        for p in wrong.parameters():
            p.add_(torch.randn_like(p))
    store = PrefixCache()
    decoder = drafted(model, wrong)
    engine = Engine(decoder, tokenizer, max_batch=4, prefix_cache=store)
    cfg = GenerationConfig(max_new_tokens=30)
    lone = engine.submit(PROMPTS[2], cfg)
    engine.step()
    engine.step()
    beside = engine.submit(PROMPTS[0], GREEDY)
    run(engine)
    counts = decoder.draft.counts
    assert counts["accepted"] < counts["drafted"]
    got = tokens(lone)
    assert [got, tokens(beside)] == [alone(model, PROMPTS[2], cfg), alone(model, PROMPTS[0])]
    assert_kept_rows_are_a_fresh_prefill(model, store, PROMPTS[2] + got)


def test_a_stop_inside_a_verified_run_ends_the_sequence_there_as_stream_does(model, tokenizer):
    # Our tiny models repeat the prompt's last token, so a stop token would end the answer at its
    # first token (the prompt's pass); a stop string of four of them ends it at the fourth, the third
    # of the eight the first verifying pass gives.
    store = PrefixCache()
    answer = tokenizer.decode(alone(model, PROMPTS[3]))
    stopping = GenerationConfig(max_new_tokens=30, stop_strings=(answer[:4],))
    expected = list(stream(model, tokenizer, PROMPTS[3], stopping))
    engine = Engine(drafted(model), tokenizer, prefix_cache=store)
    handle = engine.submit(PROMPTS[3], stopping)
    run(engine)
    got = list(handle)
    assert [(c.text, c.token_ids, c.finish_reason) for c in got] == [
        (c.text, c.token_ids, c.finish_reason) for c in expected]
    assert got[-1].finish_reason == "stop" and handle.completion_tokens == 4
    assert_kept_rows_are_a_fresh_prefill(model, store, PROMPTS[3] + [t for c in got for t in c.token_ids])


def test_sampled_and_penalized_lone_sequences_speculate_only_where_their_tokens_allow(model, tokenizer):
    decoder = drafted(model)
    engine = Engine(decoder, tokenizer)
    counts = decoder.draft.counts
    # A seed gives the tokens it gives token by token (and beside others); penalties are not the draft's.
    for cfg in (GenerationConfig(max_new_tokens=12, temperature=1.0, seed=7),
                GenerationConfig(max_new_tokens=12, repetition_penalty=1.3)):
        handle = engine.submit(PROMPTS[0], cfg)
        run(engine)
        assert tokens(handle) == alone(model, PROMPTS[0], cfg)
        assert counts["passes"] == 0
    # Unseeded: the rejection rule draws each token from the model's distribution, several a pass.
    handle = engine.submit(PROMPTS[0], GenerationConfig(max_new_tokens=12, temperature=1.0))
    run(engine)
    assert handle.completion_tokens == 12 and counts["accepted"] > 0


def test_one_at_a_time_each_sequence_speculates_though_others_wait(model, tokenizer):
    # With a single place whoever waits cannot run beside the lone sequence anyway.
    decoder = drafted(model)
    engine = Engine(decoder, tokenizer, max_batch=1)
    handles = [engine.submit(p, GREEDY) for p in PROMPTS[:3]]
    run(engine)
    assert [tokens(h) for h in handles] == [alone(model, p) for p in PROMPTS[:3]]
    assert decoder.draft.counts["passes"] == 3 * 2  # 1 + 8 + 3 tokens each


def test_a_lone_sequence_steps_on_the_decoders_graphs_and_gives_them_back_when_another_joins(model, tokenizer):
    # On the CPU the static step a CUDA graph records runs eagerly: the same cache, slots and masks.
    store = PrefixCache()
    decoder = ServingDecoder(model)
    decoder.graphs = GraphedDecoder(model, decoder.logits, capture=False)
    engine = Engine(decoder, tokenizer, max_batch=4, prefix_cache=store)
    long_cfg = GenerationConfig(max_new_tokens=40)
    lone = engine.submit(PROMPTS[3], long_cfg)
    for _ in range(3):
        engine.step()
    assert len(decoder.graphs) == 1
    with decoder.graphs.session(1, 10) as held:
        assert held is None  # the lone sequence holds them
    short = engine.submit(PROMPTS[1], GenerationConfig(max_new_tokens=4))
    engine.step()
    with decoder.graphs.session(1, 10) as free:
        assert free is not None  # given back: its rows are in its pages now
    run(engine)
    got = tokens(lone)
    assert [got, tokens(short)] == [alone(model, PROMPTS[3], long_cfg),
                                    alone(model, PROMPTS[1], GenerationConfig(max_new_tokens=4))]
    assert_kept_rows_are_a_fresh_prefill(model, store, PROMPTS[3] + got)
