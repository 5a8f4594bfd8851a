"""`vlmops app`: a chat web page (Gradio) over `ChatModel`, one model or two side by side.

models.py   what the page serves: each model loaded with its card (name, version, aliases, lineage)
turns.py    one conversation turn: the checks that turn bad input into a message, the streamed answers
access.py   who may open the page: 127.0.0.1 by default, a login for any other host
page.py     the Gradio page and its server (the only module here that imports gradio)

A UI layer like vlmops/cli/: the rest of vlmops never imports this package.
"""
