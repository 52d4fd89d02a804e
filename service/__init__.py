"""The pack's generation service and clients: pure Python (no ComfyUI, no torch); the aiohttp routes that use it
live in nodes/routes.py."""
