"""The REFER .p files are read with an unpickler that runs no code from the file."""

from __future__ import annotations

import os
import pickle

import pytest

from stamp.data.io import DataError
from stamp.data.safe_pickle import UnsafePickleError, safe_load, safe_loads


class Exploit:
    """Unpickling an instance would call os.system(...) (via __reduce__)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Custom:
    pass


def test_plain_data_round_trips(tmp_path):
    refs = [
        {
            "ref_id": 0,
            "ann_id": 1719310,
            "split": "train",
            "sentences": [{"sent": "man", "tokens": ["man"]}],
            "ratio": 0.5,
            "flag": True,
            "none": None,
            "pair": (1, 2),
            "ids": {3, 4},
            "frozen": frozenset({5}),
        }
    ]
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"refs{protocol}.p"
        path.write_bytes(pickle.dumps(refs, protocol=protocol))
        assert safe_load(path) == refs


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = pickle.dumps([{"ref_id": 0, "x": Exploit(str(marker))}], protocol=protocol)
    path = tmp_path / "refs(unc).p"
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p: refusing to load posix\.system") as err:
        safe_load(path)
    assert "plain containers" in str(err.value)
    assert not marker.exists()
    # the same data really is dangerous with the ordinary unpickler (what we avoided)
    pickle.loads(payload)
    assert marker.exists()


def test_any_class_is_refused(tmp_path):
    with pytest.raises(UnsafePickleError, match=r"test_data_pickle\.Custom"):
        safe_loads(pickle.dumps([Custom()]), "x.p")
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        safe_loads(b"cbuiltins\neval\n(S'1+1'\ntR.", "x.p")


def test_unsafe_error_is_a_data_error_and_truncated_files_are_named(tmp_path):
    assert issubclass(UnsafePickleError, DataError) and issubclass(UnsafePickleError, pickle.UnpicklingError)
    path = tmp_path / "refs(umd).p"
    path.write_bytes(pickle.dumps([{"a": 1}] * 10)[:20])
    with pytest.raises(DataError, match=r"cannot read pickle file .*refs\(umd\)\.p"):
        safe_load(path)
    with pytest.raises(DataError, match="file not found"):
        safe_load(tmp_path / "nope.p")
