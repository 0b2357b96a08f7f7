"""Per-sample identities: every image of a mixed batch equals the single-identity run with the same generator."""

from __future__ import annotations

import pytest

from diffusers_hyperlora.errors import IdentityCountError
from diffusers_hyperlora.per_sample import batch_rows


def test_batch_rows_layout():
    assert batch_rows(3, 3, guidance=False).tolist() == [0, 1, 2]
    assert batch_rows(3, 6, guidance=True).tolist() == [0, 1, 2, 0, 1, 2]
    assert batch_rows(2, 8, guidance=True).tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    for batch, guidance in ((3, False), (6, True), (5, True)):
        with pytest.raises(IdentityCountError):
            batch_rows(2, batch, guidance)
