"""The studio web UI (Gradio 6 Blocks). No tensor code lives here: it calls the same functions as
the CLI (``studio.mixing``, ``studio.pipeline``, ``studio.formats``) and runs training as a
``python -m studio train`` subprocess.

    launch.py        ``studio ui`` flags -> checked bind / auth / file access -> app.launch
    security.py      loopback-or-auth rule, reachable folders, upload checks, safe names
    library.py       the adapters folder as cards (a broken file is an error card, not a crash)
    service.py       ``Studio``: base, mix session, one lock; generate, X/Y grid, bake, inspect
    train_runner.py  a training subprocess: start, poll (progress, loss, samples), stop
    generate_tab.py  the Generate tab's layout and events
    tabs.py          the Bake, Train and Inspect tabs
    text_service.py  ``TextStudio``: a causal LM with a mix of LM adapters (the Text tab's work)
    text_tab.py      the Text tab (shown when the language-model path, ``studio.text``, exists)
    app.py           the Blocks app: tabs, queue, the shared model slot
"""
