"""The per-project logo gallery (CONTRACT §6, issue 12): add reference images
to a logo by name (upload or URL, the same input rules as standalone images),
list, get, delete; project-scoped. Reference images are kept on disk under
`<data dir>/logos/<project>/`, their embeddings (several augmented views each,
analysis/logos.py) are computed when added and cached in the store per model
fingerprint; a node running another model recomputes them from the files on
first use. Each project's gallery is held in memory, ready to score regions,
and rebuilt when the project's logos change."""

from __future__ import annotations

import asyncio
import io
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from ..analysis.analyzer import Analyzer
from ..analysis.logos import Gallery, GalleryLogo, GallerySource
from ..config import Settings
from ..errors import InputInvalid, NotFound, Unavailable
from ..inputs.fetch import FetchLimits, fetch_bytes
from ..media.stills import still_image
from ..schemas import Logo, LogoImage, Page
from ..store.sqlite import AsyncStore, Principal, Store, new_id
from .standalone import FETCH_TIMEOUT_S, MAX_IMAGE_BYTES

log = logging.getLogger(__name__)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _logo(row: tuple[str, str, float, list[tuple[str, float]]]) -> Logo:
    logo_id, name, created, images = row
    return Logo(id=logo_id, name=name, images=[LogoImage(id=i, createdAt=_iso(c)) for i, c in images],
                createdAt=_iso(created))


class ProjectGallery(GallerySource):
    """A task's view of its project's gallery: it follows additions and
    deletions while the task runs."""

    def __init__(self, service: "LogoService", project_id: str) -> None:
        self.service, self.project_id = service, project_id

    def ready(self) -> bool:
        return self.service.has_logos(self.project_id)

    async def current(self) -> Gallery | None:
        return await self.service.gallery(self.project_id)


class LogoService:
    def __init__(self, settings: Settings, store: AsyncStore, analyzer: Analyzer | None) -> None:
        self.settings = settings
        self.store = store
        self.analyzer = analyzer
        self.root = settings.data_dir / "logos"
        self._counts: dict[str, int] = {}  # project id -> its logos (read by ingest threads)
        self._galleries: dict[str, Gallery] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._generation: dict[str, int] = {}  # bumped by each change: a load that straddles one is not kept

    async def start(self) -> None:
        """Which projects have logos (so a task knows at once whether to look)."""
        self._counts = await self.store(Store.logo_counts)

    def has_logos(self, project_id: str) -> bool:
        return self._counts.get(project_id, 0) > 0

    def source(self, project_id: str) -> ProjectGallery:
        return ProjectGallery(self, project_id)

    def _model(self) -> Analyzer:
        if self.analyzer is None:
            raise Unavailable("logo detection is unavailable on this node: no model loaded",
                              details={"reason": "model_not_loaded"})
        return self.analyzer

    # --- the gallery a task scores with ---------------------------------------------------

    async def gallery(self, project_id: str) -> Gallery | None:
        """The project's gallery for this node's model (None when it has no
        logo); embeddings missing for this model are computed from the kept
        files and cached."""
        if not self.has_logos(project_id):
            return None
        held = self._galleries.get(project_id)
        if held is not None:
            return held
        lock = self._locks.setdefault(project_id, asyncio.Lock())
        async with lock:
            held = self._galleries.get(project_id)
            if held is None:
                generation = self._generation.get(project_id, 0)
                held = await self._load(project_id)
                if self._generation.get(project_id, 0) == generation:
                    self._galleries[project_id] = held
            return held

    async def _load(self, project_id: str) -> Gallery:
        analyzer = self._model()
        loop = asyncio.get_running_loop()
        fingerprint = analyzer.model.fingerprint
        rows = await self.store(Store.gallery, project_id, fingerprint)
        dim = analyzer.model.manifest.embedding_dim
        refs: dict[str, list[np.ndarray]] = {}
        names: dict[str, str] = {}
        computed = []
        for logo_id, name, image_id, path, blob in rows:
            names[logo_id] = name
            if blob is None:  # another model's embeddings only: recompute from the kept image
                try:
                    data = (self.settings.data_dir / path).read_bytes()
                    image = await loop.run_in_executor(None, lambda: still_image(
                        data, max_pixels=self.settings.limits.max_image_pixels))
                    emb = await loop.run_in_executor(None, analyzer.reference_embeddings, image)
                except (OSError, InputInvalid) as exc:
                    log.warning("logo %s: reference image %s is unusable (%s); left out", logo_id, image_id, exc)
                    continue
                computed.append((image_id, fingerprint, dim, emb.astype(np.float32).tobytes()))
            else:
                emb = np.frombuffer(blob, np.float32).reshape(-1, dim)
            refs.setdefault(logo_id, []).append(emb)
        if computed:
            await self.store(Store.save_logo_embeddings, computed)
            log.info("project %s: embedded %d logo reference image(s) for model %s", project_id, len(computed),
                     fingerprint[:12])
        logos = [GalleryLogo(lid, names[lid], np.concatenate(parts)) for lid, parts in refs.items()]
        return await loop.run_in_executor(None, analyzer.gallery, logos)

    def _changed(self, project_id: str, count: int) -> None:
        self._counts[project_id] = count
        self._generation[project_id] = self._generation.get(project_id, 0) + 1
        self._galleries.pop(project_id, None)

    # --- the API's operations -------------------------------------------------------------

    async def add(self, principal: Principal, name: str, images: list[tuple[bytes, str]]) -> Logo:
        """Add reference images ((bytes, field) each) to the logo `name`,
        created if new. 400 for what is not a supported image."""
        analyzer = self._model()
        loop = asyncio.get_running_loop()
        limits = self.settings.logos
        if len(images) > limits.max_images_per_logo:
            raise InputInvalid(f"at most {limits.max_images_per_logo} images per logo",
                               details={"field": "image", "reason": "too_many_images"})
        decoded = []
        for data, field in images:
            decoded.append(await loop.run_in_executor(None, lambda: still_image(
                data, max_pixels=self.settings.limits.max_image_pixels, field=field)))
        folder = self.root / principal.project_id
        rows, written = [], []
        try:
            for (data, _), image in zip(images, decoded):
                emb = await loop.run_in_executor(None, analyzer.reference_embeddings, image)
                image_id = new_id("img")
                kind = (Image.open(io.BytesIO(data)).format or "img").lower()
                path = folder / f"{image_id}.{kind}"
                await loop.run_in_executor(None, _write, path, data)
                written.append(path)
                rows.append((image_id, str(path.relative_to(self.settings.data_dir)), emb.astype(np.float32).tobytes()))
            logo_id = await self.store(Store.add_logo_image, principal.project_id, name, rows,
                                       analyzer.model.fingerprint, analyzer.model.manifest.embedding_dim,
                                       max_logos=limits.max_logos_per_project, max_images=limits.max_images_per_logo)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        if logo_id is None:
            for path in written:
                path.unlink(missing_ok=True)
            raise InputInvalid(f"the gallery is full: at most {limits.max_logos_per_project} logos per project "
                               f"and {limits.max_images_per_logo} images per logo",
                               details={"field": "name", "reason": "gallery_full"})
        self._changed(principal.project_id, (await self.store(Store.logo_counts)).get(principal.project_id, 0))
        return await self.get(principal, logo_id)

    async def add_from_url(self, principal: Principal, name: str, url: str) -> Logo:
        self._model()
        data = await fetch_bytes(url, sources=self.settings.sources,
                                 limits=FetchLimits(max_bytes=MAX_IMAGE_BYTES, timeout=FETCH_TIMEOUT_S))
        return await self.add(principal, name, [(data, "inputUrl")])

    async def get(self, principal: Principal, logo_id: str) -> Logo:
        rows, _ = await self.store(Store.logos, principal.project_id, 1, 1, logo_id)
        if not rows:
            raise NotFound(f"no logo {logo_id}")
        return _logo(rows[0])

    async def list(self, principal: Principal, page: int, page_size: int) -> Page[Logo]:
        rows, total = await self.store(Store.logos, principal.project_id, page, page_size)
        return Page(items=[_logo(r) for r in rows], total=total, page=page, pageSize=page_size)

    async def delete(self, principal: Principal, logo_id: str) -> None:
        paths = await self.store(Store.delete_logo, logo_id, principal.project_id)
        if paths is None:
            raise NotFound(f"no logo {logo_id}")
        for path in paths:
            (self.settings.data_dir / path).unlink(missing_ok=True)
        self._changed(principal.project_id, max(0, self._counts.get(principal.project_id, 1) - 1))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
