"""Plotly figures of V4's decisions, and their export (`save`, `export_session`)."""

from . import style
from .export import ExportError, export_session, find_browser, save
