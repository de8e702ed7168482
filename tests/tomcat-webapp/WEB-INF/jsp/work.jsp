<%--
  /api/*: the unit of work. Holds this request thread for ?ms=N milliseconds
  (default 0), then answers 200 "ok". GET, HEAD and POST (the request body, if any,
  is left for Tomcat to swallow).
--%><%@ page contentType="text/plain; charset=UTF-8" session="false" trimDirectiveWhitespaces="true"
%><%
    long ms = 0;
    String param = request.getParameter("ms");
    if (param != null) {
        try {
            ms = Long.parseLong(param.trim());
        } catch (NumberFormatException e) {
            response.sendError(400, "ms must be a whole number of milliseconds");
            return;
        }
    }
    if (ms > 0) {
        Thread.sleep(ms);
    }
    out.print("ok\n");
%>
