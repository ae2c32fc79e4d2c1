"""The clearing house's web console, served by ``clearing serve`` at ``/console``.

Server-rendered pages (Jinja2 templates, SVG charts drawn here, every asset served from the
package: no CDN, no build step) over the summaries the receiver keeps (``data.py``): no page
scans the records table; a card's history and a batch's records are read by index. Operators
sign in (``auth.py``: Argon2id password hashes, signed session cookies, a CSRF token on every
form); a viewer reads, an admin also changes the action list, and every change is audited.
"""
