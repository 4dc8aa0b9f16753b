"""Loader: determinism, exact resume, per-process sharding, buckets, padding side, threads."""
import json
import os
import shutil

import numpy as np
import pytest

from llava_jax.data import ImageProcessor, Loader, SFTDataset, default_buckets, load_tokenizer
from llava_jax.data.toy import TOY_DIR

N, IMG = 4, 511


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(os.path.join(TOY_DIR, "tokenizer"))


@pytest.fixture(scope="module")
def data(tmp_path_factory, tok):
    """40 toy conversations (some text-only, of varied length) plus two with bad images."""
    folder = tmp_path_factory.mktemp("loader")
    with open(os.path.join(TOY_DIR, "sft.json")) as f:
        records = json.load(f)[:38]
    for r in records:
        if "image" in r:
            shutil.copy(os.path.join(TOY_DIR, "images", r["image"]), folder / r["image"])
    (folder / "broken.png").write_bytes(b"garbage")
    records.insert(5, {"id": "bad1", "image": "broken.png", "conversations": records[0]["conversations"]})
    records.insert(20, {"id": "bad2", "image": "absent.png", "conversations": records[0]["conversations"]})
    (folder / "sft.json").write_text(json.dumps(records))
    return str(folder)


def dataset(data, tok, **kwargs):
    return SFTDataset(os.path.join(data, "sft.json"), tok, image_folder=data, num_image_tokens=N, image_token_index=IMG,
                      image_processor=ImageProcessor.for_image_size(28), max_length=192, **kwargs)


def make(data, tok, **kwargs):
    defaults = dict(seed=0, process_index=0, process_count=1, buckets=(64, 128, 192))
    return Loader(dataset(data, tok), 4, **{**defaults, **kwargs})


def ids_of(batch):
    return [m["index"] if m is not None else None for m in batch["meta"]]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    assert ids_of(a) == ids_of(b)
    for key in ("input_ids", "attention_mask", "labels", "loss_mask", "pixel_values", "valid"):
        np.testing.assert_array_equal(a[key], b[key])


def test_deterministic_for_a_seed_and_seed_matters(data, tok):
    a, b, c = make(data, tok, seed=1), make(data, tok, seed=1), make(data, tok, seed=2)
    run_a, run_b, run_c = take(a, 25), take(b, 25), take(c, 25)  # 25 batches of 4 > 2 epochs of 40
    for x, y in zip(run_a, run_b):
        same(x, y)
    assert [ids_of(x) for x in run_a] != [ids_of(x) for x in run_c]
    epoch0 = [i for x in run_a[:9] for i in ids_of(x)]
    assert len(set(epoch0)) == 36  # no repeats inside an epoch (40 records, 2 bad: 38 good; 36 = 9 full batches)


def test_resume_gives_exactly_the_uninterrupted_batches(data, tok):
    reference = take(make(data, tok, seed=3), 24)
    for stop in (1, 9, 10, 13):  # 10 crosses the epoch boundary (38 good examples, 2 bad ones skipped)
        first = make(data, tok, seed=3)
        take(first, stop)
        state = json.loads(json.dumps(first.state()))  # survives a checkpoint round trip
        assert set(state) >= {"epoch", "position", "seed"}
        first.close()
        resumed = make(data, tok, seed=3)
        resumed.restore(state)
        for got, want in zip(take(resumed, 24 - stop), reference[stop:]):
            same(got, want)
        resumed.close()


def test_restore_rewinds_a_live_loader(data, tok):
    loader = make(data, tok, seed=4)
    take(loader, 3)
    state = loader.state()
    after = take(loader, 5)
    loader.restore(state)
    for got, want in zip(take(loader, 5), after):
        same(got, want)
    with pytest.raises(ValueError):
        loader.restore({**state, "seed": 99})


def test_two_processes_see_disjoint_halves(data, tok):
    shards = []
    for p in range(2):
        loader = make(data, tok, seed=5, process_index=p, process_count=2, num_workers=0)
        order = loader.shard_order(0)
        shards.append(order)
        assert len(order) == 20
    assert not set(shards[0]) & set(shards[1])
    assert sorted(np.concatenate(shards).tolist()) == list(range(40))
    seen = []
    for p in range(2):
        loader = Loader(dataset(data, tok), 4, shuffle=False, num_epochs=1, drop_remainder=False,
                        process_index=p, process_count=2, buckets=(64, 128, 192))
        batches = list(loader)
        assert len(batches) == 5  # both processes step the same number of times
        seen.append([i for b in batches for i in ids_of(b) if i is not None])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(set(range(40)) - {5, 20})  # all but the 2 bad records


def test_threads_do_not_change_batches(data, tok):
    for x, y in zip(take(make(data, tok, num_workers=0), 12), take(make(data, tok, num_workers=2, prefetch=3), 12)):
        same(x, y)


def test_static_shapes_buckets_and_padding_side(data, tok):
    right = take(make(data, tok, seed=6), 12)
    left = take(make(data, tok, seed=6, pad_side="left"), 12)
    lengths = {b["input_ids"].shape[1] for b in right}
    assert lengths <= {64, 128, 192} and len(lengths) >= 2
    for r, lft in zip(right, left):
        assert r["input_ids"].shape == lft["input_ids"].shape
        assert r["pixel_values"].shape == (4, 28, 28, 3) and r["pixel_values"].dtype == np.float32
        assert r["input_ids"].dtype == np.int32 and r["attention_mask"].dtype == np.int32
        lens = r["attention_mask"].sum(1)
        np.testing.assert_array_equal(lens, lft["attention_mask"].sum(1))
        for k, n in enumerate(lens):
            np.testing.assert_array_equal(r["input_ids"][k, :n], lft["input_ids"][k, -n:])
            assert (r["input_ids"][k, n:] == tok.pad_id).all() and (r["loss_mask"][k, n:] == 0).all()
            assert r["attention_mask"][k, :n].all() and lft["attention_mask"][k, -n:].all()
            has_image = r["meta"][k]["image"] is not None
            assert ((r["input_ids"][k] == IMG).sum() == N) == has_image
            assert r["pixel_values"][k].any() == has_image  # text-only items get a zero image
    assert default_buckets(2048) == (512, 1024, 2048) and default_buckets(100) == (32, 56, 100)


def test_bad_records_are_skipped_not_fatal_and_counted_once(data, tok):
    loader = make(data, tok)
    batches = take(loader, 30)  # three epochs
    assert all(b["valid"].all() for b in batches)
    assert not {5, 20} & {i for b in batches for i in ids_of(b)}
    assert loader.report.skipped == {"corrupt_image": 1, "missing_image": 1}  # once each, not once per epoch
    strict = Loader(dataset(data, tok, strict=True), 4, shuffle=False, process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"sft.json\[5\]: corrupt_image"):
        take(strict, 3)


def test_default_process_info_and_errors(data, tok):
    loader = Loader(dataset(data, tok), 4)  # jax.process_index() / process_count() of this test: 0 / 1
    assert (loader.process_index, loader.process_count) == (0, 1)
    assert loader.steps_per_epoch() == 10
    with pytest.raises(ValueError):
        Loader(dataset(data, tok), 4, buckets=(64,))  # smaller than max_length
    with pytest.raises(ValueError):
        Loader(dataset(data, tok), 4, process_index=2, process_count=2)


def test_an_all_bad_dataset_stops_instead_of_spinning(tmp_path, tok):
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A circle."}]
    (tmp_path / "sft.json").write_text(json.dumps([{"image": f"gone{i}.png", "conversations": conv}
                                                   for i in range(6)]))
    loader = Loader(dataset(str(tmp_path), tok), 2, process_index=0, process_count=1)
    with pytest.raises(RuntimeError, match="no usable example"):
        next(loader)
    assert loader.report.skipped == {"missing_image": 6}


@pytest.mark.parametrize("per_process", [4, 6])
def test_two_processes_build_the_one_process_global_batch(data, tok, per_process):
    """Process p holds the p-th block of each global batch: process 0's rows then process 1's
    are the 1-process batch, row for row (what makes per-row draws, e.g. rollout samples,
    independent of the process count). 40 records in global batches of 12: the tail of 4
    short of a batch is dealt row by row."""
    one = Loader(dataset(data, tok), 2 * per_process, seed=5, process_index=0, process_count=1).shard_order(0)
    two = [Loader(dataset(data, tok), per_process, seed=5, process_index=p, process_count=2).shard_order(0)
           for p in range(2)]
    full = 40 // (2 * per_process)
    for k in range(full):
        rows = slice(k * per_process, (k + 1) * per_process)
        assert two[0][rows].tolist() + two[1][rows].tolist() == one[2 * k * per_process:2 * (k + 1) * per_process].tolist()
    tail = one[full * 2 * per_process:]
    assert two[0][full * per_process:].tolist() == tail[0::2].tolist()
    assert two[1][full * per_process:].tolist() == tail[1::2].tolist()
