"""The one reader of tabular manifests (CSV, JSON Lines or Parquet; local or any fsspec URI)."""

from __future__ import annotations

from typing import Any

import fsspec

from core.errors import BadInput

MANIFEST_EXTENSIONS = (".csv", ".jsonl", ".json", ".parquet")


def read_table(uri: str, what: str = "manifest") -> Any:
    """A pandas DataFrame of the table at `uri`; CSV cells stay strings ("" for empty).

    Raises BadInput naming the file when it does not exist or cannot be parsed.
    """
    import pandas as pd  # here: the MOS server imports this module without needing pandas

    from core.storage import read_parquet

    try:
        with fsspec.open(uri, "rb") as fh:
            if uri.lower().endswith(".parquet"):
                return read_parquet(fh).to_pandas()
            if uri.lower().endswith((".jsonl", ".json")):
                return pd.read_json(fh, lines=True, dtype=False)
            return pd.read_csv(fh, dtype=str, keep_default_na=False)
    except FileNotFoundError as exc:
        raise BadInput(f"{what} {uri} does not exist") from exc
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise BadInput(f"{what} {uri} cannot be read: {exc}") from exc
