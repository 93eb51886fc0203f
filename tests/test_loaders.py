"""A hub dataset with HF_HUB_OFFLINE set: read from the local hub cache when an earlier download
put it there, and a message naming the cache when it did not."""
import json

import pytest

from support.data import Example
from support.loaders import load_examples


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """A hub cache holding dataset someone/qa (one snapshot) in the layout huggingface_hub writes."""
    import huggingface_hub
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "datasets--someone--qa"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    data = repo / "snapshots" / "abc123" / "data"
    data.mkdir(parents=True)
    (data / "test-0.jsonl").write_text(json.dumps({"question": "q", "answer": ["a"]}) + "\n")
    (data / "train-0.jsonl").write_text(json.dumps({"question": "t", "answer": "b"}) + "\n")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def test_an_offline_hub_dataset_is_read_from_the_local_cache(hub_cache):
    assert load_examples("someone/qa:test") == [Example("q", ("a",), "someone/qa")]
    assert [e.question for e in load_examples("someone/qa")] == ["q", "t"]


def test_an_offline_hub_dataset_missing_from_the_cache_says_so(hub_cache):
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE is set and the dataset is not in the "
                                              f"local hub cache {hub_cache}"):
        load_examples("someone/other")
