"""The node's HTTP side: health and readiness, Prometheus metrics, a JSON API and a web console.

* ``metrics.py``: the process's instruments (counters and histograms that receive.py,
  deliver.py and infer.py update) and the collector that reads the database at scrape time;
* ``readiness.py``: what ``/readyz`` checks;
* ``auth.py``: bearer tokens, browser sessions and CSRF tokens;
* ``queries.py``: the read-only views of series, jobs, destinations and the audit trail that
  both the JSON API and the console show;
* ``app.py``: the Starlette application (routes, templates in ``templates/``);
* ``server.py``: uvicorn in a thread of ``dicom-node serve``.

Importing this package (or ``metrics``) is cheap: the web libraries are loaded only by
``app.py`` and ``server.py``, which the node imports only when ``http.enabled`` is set.
"""


class HttpBindError(OSError):
    """The HTTP port cannot be opened (in use, no permission): ``serve`` names ``http.port``."""
