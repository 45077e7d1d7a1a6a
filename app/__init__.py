"""The Streamlit dashboard over the run store (thin: it calls the data layer, computes nothing)."""
