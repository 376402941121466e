"""Label schemes: region round trips, conversions by class name, unknown values reported, custom schemes."""
from __future__ import annotations

import numpy as np
import pytest

from medseg.data.labels import LabelScheme, get_scheme, list_schemes
from medseg.errors import MedsegError

# every label of each tumour scheme, laid out on a small 3D grid with a different size per axis
TUMOUR = {"brats": (0, 1, 2, 4), "brats2023": (0, 1, 2, 3), "msd": (0, 1, 2, 3)}


def _every_label(values, shape=(5, 4, 3)) -> np.ndarray:
    rng = np.random.default_rng(0)
    out = rng.choice(np.asarray(values, np.uint8), size=shape)
    out.ravel()[: len(values)] = values  # each value present at least once
    return out


@pytest.mark.parametrize("name", sorted(TUMOUR))
def test_regions_round_trip(name):
    scheme = get_scheme(name)
    label = _every_label(TUMOUR[name])
    regions = scheme.to_regions(label)
    assert regions.shape == (3, *label.shape) and regions.dtype == bool
    assert scheme.region_names == ("WT", "TC", "ET")
    wt, tc, et = regions
    assert et.any() and (tc & ~et).any() and (wt & ~tc).any()
    assert not (et & ~tc).any() and not (tc & ~wt).any()  # ET ⊂ TC ⊂ WT
    np.testing.assert_array_equal(wt, label > 0)
    np.testing.assert_array_equal(scheme.from_regions(regions), label)
    # probabilities instead of masks: thresholded at 0.5
    probs = regions.astype(np.float32) * 0.8 + 0.1
    np.testing.assert_array_equal(scheme.from_regions(probs), label)


def test_region_membership_by_hand():
    brats = get_scheme("brats")
    got = brats.to_regions(np.array([0, 1, 2, 4])).astype(int).tolist()
    assert got == [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]
    msd = get_scheme("msd")  # 1 edema, 2 non-enhancing core, 3 enhancing
    got = msd.to_regions(np.array([0, 1, 2, 3])).astype(int).tolist()
    assert got == [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]


def test_convert_brats2023_to_brats():
    src = np.array([[0, 1, 2, 3], [3, 3, 2, 1]], np.uint8)
    out = get_scheme("brats2023").convert_to(src, get_scheme("brats"))
    np.testing.assert_array_equal(out, [[0, 1, 2, 4], [4, 4, 2, 1]])
    back = get_scheme("brats").convert_to(out, get_scheme("brats2023"))
    np.testing.assert_array_equal(back, src)


def test_convert_msd_to_brats_by_class_name():
    src = np.array([0, 1, 2, 3], np.uint8)  # msd: ED, NCR, ET
    out = get_scheme("msd").convert_to(src, get_scheme("brats"))
    np.testing.assert_array_equal(out, [0, 2, 1, 4])  # brats: ED 2, NCR 1, ET 4
    # the regions mean the same tissue in both conventions
    np.testing.assert_array_equal(get_scheme("msd").to_regions(src), get_scheme("brats").to_regions(out))


def test_convert_refuses_unknown_values_and_generic():
    with pytest.raises(MedsegError, match=r"label value\(s\) 4 are not in label scheme 'brats2023'"):
        get_scheme("brats2023").convert_to(np.array([0, 4]), get_scheme("brats"))
    with pytest.raises(MedsegError, match="generic"):
        get_scheme("labels").convert_to(np.array([0, 1]), get_scheme("brats"))
    with pytest.raises(MedsegError, match="no counterpart"):
        get_scheme("brats").convert_to(np.array([0, 1]), get_scheme("binary"))


@pytest.mark.parametrize(
    "array, bad",
    [
        (np.array([0, 1, 2, 4, 7], np.uint8), [7]),
        (np.array([0, -1, 2], np.int16), [-1]),
        (np.array([0.0, 0.5, 4.0], np.float32), [0.5]),
        (np.array([0, 3, 4], np.int64), [3]),
    ],
    ids=["7", "negative", "half", "3-is-brats2023"],
)
def test_unknown_values_are_reported(array, bad):
    scheme = get_scheme("brats")
    assert scheme.unknown_values(array) == bad
    with pytest.raises(MedsegError) as info:
        scheme.check(array, "case X: label")
    message = str(info.value)
    assert message.startswith("case X: label") and "scheme 'brats'" in message and "\n" not in message
    assert str(bad[0]) in message


def test_valid_values_are_accepted():
    assert get_scheme("brats").unknown_values(np.array([0, 1, 2, 4], np.uint8)) == []
    assert get_scheme("brats").unknown_values(np.array([0.0, 4.0], np.float32)) == []  # integral floats
    get_scheme("brats").check(np.zeros((3, 4, 5), np.uint8), "empty label")  # no error


def test_generic_scheme_accepts_any_non_negative_integer():
    scheme = get_scheme("labels")
    assert scheme.is_generic
    assert scheme.unknown_values(np.array([0, 1, 7, 300, 65535, 70000], np.int64)) == []
    assert scheme.unknown_values(np.array([0, -3, 2], np.int32)) == [-3]
    assert scheme.unknown_values(np.array([0.0, 2.5], np.float32)) == [2.5]
    with pytest.raises(MedsegError, match="no regions"):
        scheme.to_regions(np.zeros(3, np.uint8))


def test_indices_round_trip():
    scheme = get_scheme("brats")
    label = _every_label(TUMOUR["brats"])
    idx = scheme.to_indices(label)
    assert sorted(np.unique(idx).tolist()) == [0, 1, 2, 3]
    np.testing.assert_array_equal(scheme.from_indices(idx), label)


def test_custom_scheme_from_dict():
    spec = {"name": "liver", "labels": {"liver": 1, "tumour": 2}, "regions": {"organ": [1, 2], "lesion": [2]}}
    scheme = get_scheme(spec)
    assert isinstance(scheme, LabelScheme) and scheme.name == "liver"
    assert scheme.values == (0, 1, 2) and scheme.class_names == ("liver", "tumour")
    label = np.array([[0, 1], [2, 1]], np.uint8)
    np.testing.assert_array_equal(scheme.from_regions(scheme.to_regions(label)), label)
    assert scheme.unknown_values(np.array([0, 3])) == [3]
    assert LabelScheme.from_dict(scheme.to_dict()) == scheme


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"name": "x", "labels": {"a": 0}}, "distinct positive"),
        ({"name": "x", "labels": {"a": 1, "b": 1}}, "distinct positive"),
        ({"name": "x", "labels": {"a": 1}, "regions": {"R": [2]}}, r"region R uses values \[2\]"),
        ({"name": "x", "colours": {}}, "unknown keys"),
    ],
)
def test_bad_custom_schemes(spec, match):
    with pytest.raises(MedsegError, match=match):
        get_scheme(spec)


def test_unknown_scheme_name_suggests():
    with pytest.raises(MedsegError, match=r"label scheme: 'brats2032' is not valid \(did you mean 'brats2023'\?\)"):
        get_scheme("brats2032")
    with pytest.raises(MedsegError) as info:
        get_scheme("zzz")
    assert "did you mean" not in str(info.value) and "choose one of " + ", ".join(list_schemes()) in str(info.value)


def test_custom_scheme_with_non_integer_value_is_a_user_error():
    with pytest.raises(MedsegError, match="label values must be integers"):
        get_scheme({"name": "x", "labels": {"lesion": 1.5}})
