"""Embedding vectors kept as float32 bytes from the reply to the Parquet column."""

from __future__ import annotations

import array
import base64
import pickle

import pyarrow as pa
import pytest

from modelyard.batching import _floats
from modelyard.shard import _vectors
from modelyard.vectors import Vector

VALUES = [i / 7 - 20 for i in range(8)]
F32 = array.array("f", VALUES).tolist()  # the float32 values, as Python floats


def test_a_base64_embedding_is_a_vector_of_its_float32_values():
    text = base64.b64encode(array.array("f", VALUES).tobytes()).decode()
    v = _floats(text)
    assert type(v) is Vector and len(v) == 8 and v == F32 and not (v != F32)
    assert str(v) == str(F32)  # a template printing an embedding sees the list it saw before
    assert v[3] == F32[3] and list(v) == F32
    assert _floats(F32) is F32  # a float reply's list is left as it is
    with pytest.raises(ValueError, match="not a list or base64"):
        _floats(3.0)
    with pytest.raises(ValueError):  # not base64 at all: the batcher fails the batch's rows with it
        _floats("not base64!")


def test_a_vector_pickles_as_itself():
    v = Vector(VALUES)
    back = pickle.loads(pickle.dumps(v))
    assert type(back) is Vector and back == v and back.le_bytes() == v.le_bytes()


def test_the_column_takes_vectors_lists_and_nulls():
    typ = pa.list_(pa.float32(), 8)
    col = _vectors([Vector(VALUES), None, VALUES], typ)
    assert col.type == typ and col.null_count == 1
    assert col.to_pylist() == [F32, None, F32]


def test_a_vector_of_the_wrong_size_is_refused_not_misaligned():
    with pytest.raises(ValueError, match="embedding of 7 values in a column of 8"):
        _vectors([Vector(VALUES), Vector(VALUES[:7])], pa.list_(pa.float32(), 8))


def test_a_wave_file_keeps_vectors_as_their_values(tmp_path):
    """A GPU wave's rows go to the next wave through JSON: a Vector written as its text came back
    as a string of 8,370 characters, and the last wave's column refused it (seen in the suite)."""
    from modelyard.staging import Staging

    staging = Staging.for_job(str(tmp_path / "out"), "k")
    path = staging.wave_shard(0, 0)
    staging.write_json(path, {"results": [[{"embedding": Vector(VALUES)}, {}, []]]})
    back = staging.read_json(path)["results"][0][0]["embedding"]
    assert back == F32
    assert _vectors([back], pa.list_(pa.float32(), 8)).to_pylist() == [F32]
