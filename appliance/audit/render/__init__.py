"""The report's renderings: JUnit XML (junit.py) and the one-page HTML report (html.py, report.html.j2).

Both are made from the Report model alone (appliance/audit/report.py); the JSON report is the model itself.
"""

from appliance.audit.render.html import html_page
from appliance.audit.render.junit import junit_xml

__all__ = ["html_page", "junit_xml"]
