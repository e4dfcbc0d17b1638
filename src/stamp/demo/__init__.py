"""The web demo (``stamp-demo``): chat about an image in the browser and see the masks.

``backend`` holds what the page does (image checks, the conversation, overlays) without any
web framework; ``app`` lays it out as a Gradio page and serves it.
"""
