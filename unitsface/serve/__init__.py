"""`unitsface serve`: a small local web page to compare two faces with a model.

`create_app(verifier, val_bin)` builds the FastAPI app (see `unitsface.serve.app`); the page is
`static/index.html`, plain HTML and JavaScript with nothing loaded from elsewhere, because the
machines it runs on have no internet. Importing this package needs the `serve` extra
(fastapi, uvicorn, python-multipart).
"""

from unitsface.serve.app import MAX_UPLOAD_BYTES, create_app

__all__ = ["MAX_UPLOAD_BYTES", "create_app"]
