"""Items the spider yields: one :class:`PhotoItem` per downloaded full-size image.

The spider fills the provenance fields and the raw bytes; the pipelines (:mod:`crawler.pipelines`) fill the
measured fields in turn (``width``/``height`` by the image check, ``sha256``/``path`` by the dedupe step) and the
store writes :meth:`PhotoItem.record` as one manifest line (format in :mod:`crawler.store`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PhotoItem:
    """One full-size image and where it came from.

    Attributes:
        identity: Filesystem-safe person id derived from the person page URL (see ``store.safe_identity``).
        name: Display name from the person page's heading.
        image_url: Absolute URL of the image file, as linked from the photo page.
        page_url: Absolute URL of the photo page that shows the image.
        body: Raw response bytes; cleared once stored, never logged.
        width: Displayed width in pixels (EXIF orientation applied), set by ``ImageCheckPipeline``.
        height: Displayed height in pixels, set by ``ImageCheckPipeline``.
        sha256: Hex digest of ``body``, set by ``DedupPipeline``.
        path: Path of the stored file relative to the output folder, set by ``DedupPipeline``.
    """

    identity: str
    name: str
    image_url: str
    page_url: str
    body: bytes = field(repr=False)
    width: int = 0
    height: int = 0
    sha256: str = ""
    path: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        """Order among copies of the same content: the smallest key is the one kept (deterministic)."""
        return (self.identity, self.image_url, self.page_url)

    def record(self) -> dict[str, str | int]:
        """The manifest line for this image (field order is the manifest's)."""
        return {
            "identity": self.identity,
            "name": self.name,
            "image_url": self.image_url,
            "page_url": self.page_url,
            "path": self.path,
            "width": self.width,
            "height": self.height,
            "sha256": self.sha256,
        }
