"""MergeLens: the Streamlit entry point. ``st.navigation`` lists the pages explicitly (STYLE.md, Streamlit)."""

import os

import streamlit as st


def suite_built() -> bool:
    """Whether the suite the sidebar shows (or will show first) is built: then the Tour leads the navigation."""
    import ui
    from merging.suites import list_suites

    name = st.session_state.get("suite") or os.environ.get("MERGELENS_DEFAULT_SUITE", list_suites()[0])
    return ui.suite_is_built(name)


def main() -> None:
    st.set_page_config(page_title="MergeLens", page_icon="🔬", layout="wide")
    tour = st.Page("app_pages/tour.py", title="Tour", icon=":material/school:")
    pages = [
        st.Page("app_pages/home.py", title="Overview", icon=":material/home:", default=True),
        st.Page("app_pages/merge.py", title="Merge", icon=":material/merge:"),
        st.Page("app_pages/representation_bias.py", title="Representation bias", icon=":material/scatter_plot:"),
        st.Page("app_pages/method_comparison.py", title="Method comparison", icon=":material/compare:"),
        st.Page("app_pages/why_merges_fail.py", title="Why merges fail", icon=":material/troubleshoot:"),
        st.Page("app_pages/ablations.py", title="Ablations", icon=":material/tune:"),
    ]
    pages = [tour, *pages] if suite_built() else [*pages, tour]  # the Overview stays the default page: it builds the suite
    st.navigation(pages).run()


main()
