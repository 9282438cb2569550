"""``bolid app``: a web page for generation (Gradio Blocks) over the same code as ``bolid generate``.

* :mod:`bolid.app.engine` - the work (references, generation, Body Sim, files), no web framework;
* :mod:`bolid.app.draw` - the reference overlays and the body-shape chart;
* :mod:`bolid.app.ui` - the Gradio page; the only module that imports Gradio (``pip install 'bolid[app]'``).

Bundled example photos live in ``examples/`` (licences in its README).
"""

from __future__ import annotations

from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent / "examples"
