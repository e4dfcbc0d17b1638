"""The demo as a Gradio page, served on the loopback interface only.

Model requests (answers, SAM refinement) share one concurrency group of ``concurrency`` slots:
the others wait in Gradio's queue, which shows their position. Light actions (uploads, the
gallery, opacity) run outside that group, so a slow answer never blocks them.
"""

from __future__ import annotations

import os

# A local demo never phones home: no Gradio analytics or version check, no Hub telemetry.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402

from stamp.demo.backend import DemoBackend, View  # noqa: E402

HOST = "127.0.0.1"
MODEL = "model"  # the concurrency group of requests that run the model
IMAGE_BUTTONS = ["download", "fullscreen"]  # not "share" (to Hugging Face)
INTRO = """## STAMP: chat about an image, segment what you ask for
Upload an image (or click an example), type a request such as *Please segment the red circle.*
and press **Send**: the answer appears in the conversation, its masks over the image. Follow-up
requests keep the conversation; **New conversation** starts over on the same image."""


def build_app(backend: DemoBackend, alpha: float, concurrency: int) -> gr.Blocks:
    """The page. ``alpha`` is the initial mask opacity; ``concurrency`` the model slots."""
    with gr.Blocks(title="STAMP demo", analytics_enabled=False) as app:
        session = gr.State(None)
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(
                    label="Upload an image",
                    file_count="single",
                    type="filepath",
                    height=110,
                    elem_id="upload",
                )
                image = gr.Image(
                    label="Image (as the model sees it)",
                    type="pil",
                    format="png",
                    interactive=False,
                    height=300,
                    buttons=IMAGE_BUTTONS,
                    elem_id="image",
                )
                gallery = gr.Gallery(
                    value=[(s.image, s.messages[0]["content"]) for s in backend.examples],
                    label="Examples (synthetic scenes): click one",
                    columns=3,
                    height="auto",
                    allow_preview=False,
                    interactive=False,
                    buttons=[],
                    visible=bool(backend.examples),
                    elem_id="examples",
                )
            with gr.Column(scale=1):
                overlay = gr.Image(
                    label="Masks of the last answer",
                    type="pil",
                    format="png",
                    interactive=False,
                    height=300,
                    buttons=IMAGE_BUTTONS,
                    elem_id="overlay",
                )
                chat = gr.Chatbot(
                    label="Conversation",
                    height=340,
                    feedback_options=None,
                    buttons=["copy_all"],
                    elem_id="chat",
                )
                query = gr.Textbox(
                    label="Request",
                    placeholder="Please segment the red circle.",
                    max_lines=4,
                    elem_id="query",
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("New conversation", elem_id="clear")
                status = gr.Markdown("Upload an image or pick an example to start.", elem_id="status")
        with gr.Accordion("Options and raw output", open=True):
            with gr.Row():
                sam = gr.Checkbox(
                    label="Refine masks with SAM",
                    value=False,
                    interactive=backend.sam_available,
                    elem_id="sam",
                    info="with the configured SAM checkpoint"
                    if backend.sam_available
                    else "needs a SAM checkpoint: stamp-demo sam.checkpoint=sam_vit_h_4b8939.pth",
                )
                opacity = gr.Slider(0.0, 1.0, value=alpha, step=0.05, label="Mask opacity", elem_id="alpha")
            with gr.Row():
                raw = gr.Textbox(
                    label="Raw answer (as generated, <|seg|> included)",
                    interactive=False,
                    lines=2,
                    elem_id="raw",
                )
                mask = gr.Image(
                    label="Mask (union of the masks)",
                    type="pil",
                    format="png",
                    interactive=False,
                    buttons=IMAGE_BUTTONS,
                    elem_id="mask",
                )

        full = [session, chat, image, overlay, mask, raw, status]  # after a new image or conversation
        turn = [session, chat, overlay, mask, raw, status]  # after an answer: the image stays

        def show(view: View, with_image: bool) -> list:
            status = view.status if view.status is not None else gr.skip()
            values = [view.chat, view.image, view.overlay, view.mask, view.raw, status]
            return values if with_image else values[:1] + values[2:]

        def on_upload(path, alpha):
            s, view = backend.open_image(path, alpha)
            return [s, *show(view, True), None]  # empty the drop zone: ready for the next file

        def on_example(alpha, evt: gr.SelectData):
            s, view, question = backend.open_example(evt.index, alpha)
            return [s, *show(view, True), question]

        def on_ask(s, text, use_sam, alpha):  # streams: the answer grows, then the masks appear
            for new, view, answered in backend.ask_stream(s, text, use_sam, alpha):
                yield [new, *show(view, False), "" if answered else gr.skip()]

        def on_sam(s, use_sam, alpha):
            s, view = backend.redraw(s, use_sam, alpha)
            return [s, *show(view, False)]

        def on_opacity(s, use_sam, alpha):
            s, view = backend.redraw(s, use_sam, alpha, refine=False)  # never runs SAM outside the queue
            return [s, *show(view, False)]

        def on_clear(s, alpha):
            s, view = backend.clear(s, alpha)
            return [s, *show(view, True)]

        light = dict(concurrency_limit=None, show_progress="hidden")
        heavy = dict(concurrency_id=MODEL, concurrency_limit=concurrency)
        upload.upload(on_upload, [upload, opacity], [*full, upload], **light)
        gallery.select(on_example, [opacity], [*full, query], **light)
        for trigger in (send.click, query.submit):
            trigger(on_ask, [session, query, sam, opacity], [*turn, query], **heavy)
        sam.change(on_sam, [session, sam, opacity], turn, **heavy)
        opacity.change(on_opacity, [session, sam, opacity], turn, trigger_mode="always_last", **light)
        clear.click(on_clear, [session, opacity], full, **light)
        chat.clear(on_clear, [session, opacity], full, **light)  # the chat's own bin icon
    return app


def serve(
    app: gr.Blocks, port: int | None, queue_size: int, max_file_size: str, block: bool = True
) -> gr.Blocks:
    """Serve ``app`` on ``127.0.0.1:port`` (never a public share link). With ``block`` this
    returns when the server stops (Ctrl-C); otherwise at once, and ``app.close()`` stops it."""
    app.queue(max_size=queue_size)
    app.launch(
        server_name=HOST,
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=True,
        quiet=True,  # Gradio's banner suggests share=True; we print the address ourselves
        show_error=True,
        max_file_size=max_file_size,
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        enable_monitoring=False,
        run_history=False,
        footer_links=["api", "settings"],
    )
    print(f"stamp-demo: serving on {app.local_url} (Ctrl-C stops)", flush=True)
    if block:
        app.block_thread()
    return app
