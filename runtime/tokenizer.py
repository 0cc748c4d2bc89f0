"""The checkpoint's tokenizer (tokenizer.json through `tokenizers`), when the source folder has one."""

from __future__ import annotations

from pathlib import Path


class Tokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = path
        self._tok = HFTokenizer.from_file(str(path))

    @classmethod
    def find(cls, folder: str | Path | None) -> Tokenizer | None:
        if folder is None:
            return None
        path = Path(folder) / "tokenizer.json"
        return cls(path) if path.is_file() else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)
