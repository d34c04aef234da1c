"""Which objects are delta candidates, and how good a delta must be to keep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from dgproxy.config import BucketPolicy, Config


@dataclass(frozen=True)
class DeltaPolicy:
    extensions: tuple[str, ...]
    max_delta_ratio: float
    max_delta_object_size: int
    bucket_policy: Callable[[str], BucketPolicy]

    @classmethod
    def from_config(cls, config: Config) -> "DeltaPolicy":
        return cls(tuple(e.lower() for e in config.delta_extensions), config.max_delta_ratio,
                   config.max_delta_object_size, config.bucket_policy)

    def eligible(self, bucket: str, filename: str, size: Optional[int]) -> bool:
        """A delta candidate: compression on, an eligible extension, not too large."""
        if not self.bucket_policy(bucket).compression:
            return False
        if size is not None and size > self.max_delta_object_size:
            return False
        return self.delta_named(filename)

    def delta_named(self, filename: str) -> bool:
        """Whether dgproxy could store C{filename} as a delta in any bucket."""
        name = filename.lower()
        return any(name.endswith(ext) for ext in self.extensions)

    def ratio(self, bucket: str) -> float:
        own = self.bucket_policy(bucket).max_delta_ratio
        return self.max_delta_ratio if own is None else own
