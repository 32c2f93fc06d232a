"""Size strings: binary IEC and bare letters, decimal SI."""

import pytest

from hybrid_gguf.errors import HybridError
from hybrid_gguf.sizes import format_size, parse_size

GIB = 1024**3


@pytest.mark.parametrize("text, expected", [
    ("8GiB", 8 * GIB), ("8G", 8 * GIB), ("8g", 8 * GIB), ("8 gib", 8 * GIB), ("8GIB", 8 * GIB),
    ("512MiB", 512 * 1024**2), ("512M", 512 * 1024**2), ("1.5GB", 1_500_000_000),
    ("1.5gb", 1_500_000_000), ("2MB", 2_000_000), ("4kB", 4000), ("4KiB", 4096),
    ("123", 123), ("123B", 123), (" 0.5 GiB ", GIB // 2), (".5M", 512 * 1024),
    ("1TiB", 1024**4), ("2T", 2 * 1024**4), (4096, 4096),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "abc", "8XB", "-1", "1e3", "8 G B", "inf", "1.2.3G", "8 GiBs"])
def test_parse_size_rejects(text):
    with pytest.raises(HybridError, match="size"):
        parse_size(text)


def test_parse_size_rejects_negative_int_and_bool():
    with pytest.raises(HybridError):
        parse_size(-5)
    with pytest.raises(HybridError):
        parse_size(True)


def test_format_size():
    assert format_size(123) == "123 B"
    assert format_size(1536) == "1.50 KiB"
    assert format_size(8 * GIB) == "8.00 GiB"
    assert format_size(3 * 1024**4) == "3.00 TiB"
    assert parse_size(format_size(8 * GIB).replace(" ", "")) == 8 * GIB
