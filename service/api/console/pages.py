"""The console's pages under ``/ui`` (``/`` redirects there): server-rendered Jinja2, vendored CSS and JS.

=============================================  =====================================================================
route                                          page
=============================================  =====================================================================
GET  /ui                                       line view: verdict tiles of the latest parts, counts of the last hour,
                                               recent rejects as thumbnails; filters product, line; live (polls
                                               /ui/live, 1.5 s)
GET  /ui/live                                  the live part of the line view (HTML fragment)
GET  /ui/inspections/{id}                      one inspection: image layers, regions, score bar, versions, timings,
                                               reviews
POST /ui/inspections/{id}/review               form: decision, note, reviewer (+ csrf) -> 303 back (or to ``next``)
POST /ui/inspections/{id}/as-reference         false reject + the original added as a reference (admin only)
GET  /ui/queue                                 unreviewed review/defect inspections, oldest first, keyboard triage
GET  /ui/products, /ui/products/{n}?page=P     product list; product: thresholds, calibration plot, page P of the
                                               references (``views.GALLERY_PAGE``, newest first; past the last page:
                                               the last; P < 1 or not a number: 422 like any bad query value)
POST /ui/products/{n}/thresholds               admin only: new thresholds
POST /ui/products/{n}/references               admin only: add references (multipart ``image``), the API's path
POST /ui/products/{n}/references/{r}/delete    admin only: remove a reference -> 303 back to the gallery page ``page``
GET  /ui/products/{n}/references/{r}.jpg       a reference as a gallery thumbnail (rendered once, cached beside it)
GET  /ui/login, POST /ui/login                 ask for a key once (when keys are configured); POST /ui/logout
                                               forgets it
GET  /ui/inspections/{id}/{kind}.png           artefacts and ``/ui/thumbs/{id}.jpg`` thumbnails, with the key cookie
GET  /ui/inspections/{id}/original.jpg         the stored original (JPEG preview), the inspection page's base layer
=============================================  =====================================================================

A refused form post (CSRF, role, invalid field, 404, 409, bad upload) answers the API problem's status as an HTML
page (``error.html``: title, detail, a link back to the form's page); see ``ConsoleFormRoute``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field, ValidationError

from service.storage.artefacts import ArtefactMissingError

from .. import rendering
from ..deps import AppSettings, Context, Store
from ..problems import PROBLEM_ERRORS, Problem, as_problem
from ..routes_inspections import InspectionId, ProductName, artefact_response, save_product
from ..routes_knowledge import ReferenceId, remove_reference, store_references
from ..routes_reviews import submit_review
from ..routes_segment import read_uploads
from ..schemas import ProductIn, ReviewIn
from ..security import Caller, forbid_unless_admin
from . import auth, views
from .auth import ConsoleCaller

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.globals["csrf_field"] = auth.CSRF_FIELD
FilterText = Annotated[str | None, Query(max_length=200)]
GalleryPage = Annotated[int, Query(ge=1, description="page of the reference gallery, 1-based")]


class GalleryPageIn(BaseModel):
    """The gallery page a reference was removed from (the delete form's hidden field): where the operator returns."""

    page: int = Field(1, ge=1)


def gallery_url(name: str, page: int) -> str:
    """The product page showing page ``page`` of its references."""
    return f"/ui/products/{name}" + (f"?page={page}" if page > 1 else "") + "#references"


def form_origin(path: str) -> str:
    """The console page whose form posts to ``path`` (an inspection, a product, the sign-in form), else ``/ui``."""
    found = re.match(r"/ui/(?:inspections|products)/[^/]+|/ui/login$", path)
    return found.group(0) if found else "/ui"


class ConsoleFormRoute(APIRoute):
    """The console's routes: a refused form post (any POST under ``/ui``; all come from the console's HTML forms)
    answers the problem's status, headers and title/detail as a page in the console's layout with a link back to the
    page of the form. API routes are not of this class and keep answering ``application/problem+json``."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except PROBLEM_ERRORS as exc:
                if request.method != "POST":
                    raise
                problem = as_problem(request, exc)
                path = request.url.path.removeprefix(request.scope.get("root_path", "").rstrip("/"))
                response = render(
                    request,
                    "error.html",
                    None,
                    problem.status,
                    problem=problem,
                    back=form_origin(path),
                    request_id=request.scope.get("state", {}).get("request_id"),
                )
                response.headers.update(problem.headers or {})
                return response

        return handle


def render(request: Request, template: str, caller: Caller | None, status_code: int = 200, **context) -> Response:
    """A page: the template with the caller, the CSRF token and the auth state; sets a new CSRF cookie if made."""
    context.update(
        caller=caller,
        csrf=auth.csrf_token(request),
        auth_enabled=caller is not None and caller.role != "open",
        root=request.scope.get("root_path", "").rstrip("/"),
    )
    response = templates.TemplateResponse(request, template, context, status_code=status_code)
    return auth.set_cookies(response, request)


router = APIRouter(prefix="/ui", include_in_schema=False, route_class=ConsoleFormRoute)


@asynccontextmanager
async def checked_form(request: Request, authorise: Callable[[], None] | None = None, **limits):
    """The form of a console post after the CSRF check (403) and ``authorise()`` (403), in that order."""
    async with request.form(**limits) as form:
        auth.check_csrf(request, form)
        if authorise is not None:
            authorise()
        yield form


async def posted(
    request: Request,
    model: type[BaseModel],
    authorise: Callable[[], None] | None = None,
    kept: dict | None = None,
    **fixed: str,
):
    """A console form post: ``checked_form``, then the fields of ``model`` (``kept`` ones where the form has none,
    ``fixed`` ones replacing the form's) validated (422 problem naming them). Returns ``(model instance, the form's
    "next" field or None)``."""
    async with checked_form(request, authorise) as form:
        sent = {k: form.get(k) for k in model.model_fields if isinstance(form.get(k), str)}
        fields = (kept or {}) | sent | fixed
        next_url = form.get("next")
    try:
        body = model(**fields)
    except ValidationError as exc:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise Problem(422, "Invalid form", detail, "validation-error") from None
    return body, next_url if isinstance(next_url, str) else None


def jpeg(data: bytes | None, title: str, detail: str, cache: str = "") -> Response:
    """A JPEG answer the browser keeps for a day (``cache`` adds to Cache-Control), or a 404 problem without data."""
    if data is None:
        raise Problem(404, title, detail, "not-found")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400" + cache})


@router.get("")
async def line_view(
    request: Request, caller: ConsoleCaller, store: Store, product: FilterText = None, line: FilterText = None
):
    live, facets = await asyncio.gather(
        asyncio.to_thread(views.line_snapshot, store, product or None, line or None),
        asyncio.to_thread(store.facets),
    )
    return render(request, "line.html", caller, live=live, facets=facets, product=product or "", line=line or "")


@router.get("/live")
async def line_live(
    request: Request, caller: ConsoleCaller, store: Store, product: FilterText = None, line: FilterText = None
):
    live = await asyncio.to_thread(views.line_snapshot, store, product or None, line or None)
    return render(request, "_live.html", caller, live=live)


@router.get("/inspections/{inspection_id}")
async def inspection_page(request: Request, caller: ConsoleCaller, ctx: Context, inspection_id: InspectionId):
    page = await asyncio.to_thread(views.inspection_detail, ctx, inspection_id)
    if page is None:
        return render(request, "missing.html", caller, status_code=404, what=f"inspection {inspection_id}")
    return render(request, "inspection.html", caller, **page)


@router.post("/inspections/{inspection_id}/review")
async def review_form(request: Request, caller: ConsoleCaller, ctx: Context, inspection_id: InspectionId):
    body, next_url = await posted(request, ReviewIn)
    await submit_review(ctx, inspection_id, body, caller)
    return RedirectResponse(auth.safe_next(next_url or f"/ui/inspections/{inspection_id}"), status_code=303)


@router.post("/inspections/{inspection_id}/as-reference")
async def false_reject_reference_form(
    request: Request, caller: ConsoleCaller, ctx: Context, inspection_id: InspectionId
):
    """One action: review as false reject and add the stored original as a good reference (admin only)."""
    body, _ = await posted(request, ReviewIn, decision="false_reject", add_reference="true")
    await submit_review(ctx, inspection_id, body, caller)
    return RedirectResponse(f"/ui/inspections/{inspection_id}", status_code=303)


@router.get("/queue")
async def review_queue(request: Request, caller: ConsoleCaller, store: Store):
    queue = await asyncio.to_thread(views.review_queue, store)
    return render(request, "queue.html", caller, **queue)


@router.get("/products")
async def products_page(request: Request, caller: ConsoleCaller, store: Store):
    profiles, facets = await asyncio.gather(asyncio.to_thread(store.list_products), asyncio.to_thread(store.facets))
    names = sorted({p.name for p in profiles} | set(facets["products"]))
    return render(request, "products.html", caller, profiles={p.name: p for p in profiles}, names=names)


@router.get("/products/{name}")
async def product_page(request: Request, caller: ConsoleCaller, ctx: Context, name: ProductName, page: GalleryPage = 1):
    detail = await asyncio.to_thread(views.product_detail, ctx, name, page)
    return render(request, "product.html", caller, **detail)


@router.post("/products/{name}/thresholds")
async def thresholds_form(request: Request, caller: ConsoleCaller, store: Store, name: ProductName):
    # the form shows the thresholds and the score; the review zone and the fusion weight stay as they are
    existing = await asyncio.to_thread(store.get_product, name)
    kept = {k: getattr(existing, k) for k in ("review_threshold", "fusion_weight")} if existing else {}
    body, _ = await posted(request, ProductIn, lambda: forbid_unless_admin(caller, "change thresholds"), kept)
    await save_product(store, name, body)
    return RedirectResponse(f"/ui/products/{name}", status_code=303)


@router.post("/products/{name}/references")
async def add_references_form(request: Request, caller: ConsoleCaller, ctx: Context, name: ProductName):
    """Admin only: the files of the multipart field ``image`` become references (the API's path, all or nothing)."""
    limits = {"max_files": ctx.settings.queue_size + 1}
    async with checked_form(request, lambda: forbid_unless_admin(caller, "add references"), **limits) as form:
        uploads = await read_uploads(form, ctx.settings)
    await store_references(ctx, name, uploads)
    return RedirectResponse(gallery_url(name, 1), status_code=303)  # newest first: the new ones are on page 1


@router.post("/products/{name}/references/{ref_id}/delete")
async def delete_reference_form(
    request: Request, caller: ConsoleCaller, ctx: Context, name: ProductName, ref_id: ReferenceId
):
    body, _ = await posted(request, GalleryPageIn, lambda: forbid_unless_admin(caller, "remove references"))
    await remove_reference(ctx, name, ref_id)
    return RedirectResponse(gallery_url(name, body.page), status_code=303)  # a page gone since: shows the last


@router.get("/products/{name}/references/{ref_id}.jpg")
async def reference_thumbnail(_: ConsoleCaller, ctx: Context, name: ProductName, ref_id: ReferenceId):
    """A reference image as a JPEG of at most GALLERY_SIZE pixels (rendered on first request and cached in the
    artefact store beside the reference, see ``views.reference_preview``; the browser keeps it too)."""
    try:
        data = await asyncio.to_thread(views.reference_preview, ctx, name, ref_id)
    except ArtefactMissingError as exc:
        raise Problem(404, "Reference image missing", f"the store has lost it: {exc}", "not-found") from None
    return jpeg(data, "Reference not found", f"product {name!r} has no reference {ref_id!r}", ", immutable")


@router.get("/inspections/{inspection_id}/original.jpg")
async def original_image(_: ConsoleCaller, ctx: Context, inspection_id: InspectionId):
    """The stored original as the page's base layer (JPEG, see ``views.original_preview``)."""
    data = await asyncio.to_thread(views.original_preview, ctx, inspection_id)
    return jpeg(data, "Original not stored", f"inspection {inspection_id!r} has no stored original")


@router.get("/inspections/{inspection_id}/{kind}.png")
async def console_artefact(_: ConsoleCaller, store: Store, inspection_id: InspectionId, kind: str):
    return await artefact_response(store, inspection_id, kind)


@router.get("/thumbs/{inspection_id}.jpg")
async def thumbnail(_: ConsoleCaller, store: Store, inspection_id: InspectionId):
    data = await asyncio.to_thread(rendering.thumbnail, store, inspection_id)
    return jpeg(data, "Thumbnail not found", f"inspection {inspection_id!r} has no overlay")


@router.get("/login")
async def login_page(request: Request, next: str | None = Query(None, max_length=2000)):
    return render(request, "login.html", None, next=auth.safe_next(next), failed=False)


@router.post("/login")
async def login(request: Request, settings: AppSettings):
    async with request.form() as form:
        auth.check_csrf(request, form)
        key, next_url = form.get("key"), form.get("next")
    next_url = auth.safe_next(next_url if isinstance(next_url, str) else None)
    if isinstance(key, str) and auth.key_accepted(key, settings):
        return auth.sign_in(request, key, next_url)
    return render(request, "login.html", None, status_code=401, next=next_url, failed=True)


@router.post("/logout")
async def logout(request: Request, settings: AppSettings):
    async with request.form() as form:
        auth.check_csrf(request, form)
    return auth.sign_out(settings)


root_router = APIRouter(include_in_schema=False)


@root_router.get("/")
async def root():
    return RedirectResponse("/ui", status_code=307)
