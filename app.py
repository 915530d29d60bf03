"""MergeLens: the Streamlit entry point. ``st.navigation`` lists the pages explicitly (STYLE.md, Streamlit)."""

import streamlit as st


def main() -> None:
    st.set_page_config(page_title="MergeLens", page_icon="🔬", layout="wide")
    pages = [
        st.Page("app_pages/home.py", title="Overview", icon=":material/home:", default=True),
        st.Page("app_pages/merge.py", title="Merge", icon=":material/merge:"),
        st.Page("app_pages/representation_bias.py", title="Representation bias", icon=":material/scatter_plot:"),
        st.Page("app_pages/method_comparison.py", title="Method comparison", icon=":material/compare:"),
        st.Page("app_pages/ablations.py", title="Ablations", icon=":material/tune:"),
    ]
    st.navigation(pages).run()


main()
