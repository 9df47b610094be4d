"""One request cannot take the app (issue 33, finding 1): its captions' total length is bounded, the
text encoder's memo is bounded by bytes, and short rankings are answered while long ones run. Through
the real app on the bundled model (a frozen MiniLM, whose memo and cost are what is bounded)."""

import threading
import time

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError

import app_logic
from benchmarks.app_load import long_captions
from checkpoints import DEFAULT_CHECKPOINT
from conftest import CAT, rank

@pytest.fixture(scope="module")
def checkpoint():
    """The bundled model for conftest's ``served`` app (replaces conftest's small GRU checkpoint)."""
    return DEFAULT_CHECKPOINT


def long_ranking(seed: int, total: int = app_logic.MAX_TOTAL_CHARS) -> str:
    """Captions of ``app_logic.MAX_CAPTION_CHARS`` at most, ``total`` characters at most in all,
    new for every ``seed`` (none is in the memo yet)."""
    return long_captions(seed, total, app_logic.MAX_CAPTION_CHARS)


def test_a_ranking_longer_than_the_total_bound_is_refused(client):
    captions = long_ranking(0, total=app_logic.MAX_TOTAL_CHARS + 5 * app_logic.MAX_CAPTION_CHARS)
    assert all(len(c) <= app_logic.MAX_CAPTION_CHARS for c in captions.splitlines())
    assert len(captions.splitlines()) <= app_logic.MAX_CAPTIONS
    with pytest.raises(AppError, match=f"at most {app_logic.MAX_TOTAL_CHARS:,} at a time"):
        rank(client, handle_file(CAT), captions)


def test_the_caption_memo_stays_within_its_byte_bound(served, client, monkeypatch):
    text = served[1].model.text_encoder
    bound = 8 * 2**20  # about one and a half long rankings' states
    monkeypatch.setattr(text, "memo_bytes", bound, raising=False)
    for seed in range(1, 4):
        assert len(rank(client, handle_file(CAT), long_ranking(seed))[0]["data"]) > 1
        assert sum(states.nbytes for states in text._memo.values()) <= bound


def test_a_short_ranking_is_answered_while_long_ones_run_and_a_third_long_one_is_refused(served, client):
    from gradio_client import Client

    done: dict[str, float] = {}

    def ranked(name: str, captions: str) -> None:
        rank(Client(served[0], verbose=False), handle_file(CAT), captions)
        done[name] = time.monotonic()

    rank(client, handle_file(CAT), "a cat")  # the photo's regions cached: the short ranking reads text only
    long_ones = [threading.Thread(target=ranked, args=(f"long{seed}", long_ranking(seed))) for seed in (10, 11)]
    for thread in long_ones:
        thread.start()
    time.sleep(1.0)  # both long rankings are running (each takes seconds)
    ranked("short", "a cat lying on a blanket\ntwo planes at an air show")
    with pytest.raises(AppError, match="long caption lists are being ranked right now"):
        rank(client, handle_file(CAT), long_ranking(12))  # a third long one waits for no slot
    refused = time.monotonic()
    for thread in long_ones:
        thread.join(timeout=300)
    assert set(done) == {"long10", "long11", "short"}
    assert done["short"] < refused < min(done["long10"], done["long11"])



def test_ranking_in_chunks_scores_as_one_batch(served):
    import numpy as np
    import torch

    from adapt.pipeline import caption_chunks

    retriever = served[1]
    _, regions = retriever.regions(CAT)
    captions = ["a cat", "a cat lying on a purple blanket", *long_ranking(20).splitlines()]
    assert len(caption_chunks(retriever.model.tokenize(captions).mask.sum(1).tolist())) > 1
    ranked = retriever.rank_captions(regions, captions)
    whole = retriever.model.score(torch.from_numpy(regions.features[None]), captions)
    by_caption = dict(zip(ranked.captions, ranked.scores))
    np.testing.assert_allclose([by_caption[c] for c in captions], whole.scores[0].numpy(), rtol=1e-4, atol=1e-5)
