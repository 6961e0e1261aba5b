"""Streamlit pages for operators (read the store and the registry; never train or score)."""
