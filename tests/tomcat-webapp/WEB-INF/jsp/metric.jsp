<%--
  /actuator/metrics/tomcat.threads.busy and /actuator/metrics/tomcat.threads.config.max,
  read the way Micrometer's TomcatMetrics reads them: the currentThreadsBusy and
  maxThreads attributes of the Catalina:type=ThreadPool,name=* MBeans, summed over
  connectors (there is one), answered in Spring Boot Actuator's JSON shape.
--%><%@ page contentType="application/json" session="false" trimDirectiveWhitespaces="true"
    import="java.lang.management.ManagementFactory, javax.management.MBeanServer, javax.management.ObjectName, java.util.ArrayList, java.util.List"
%><%
    String path = request.getServletPath();
    String metric = path.substring(path.lastIndexOf('/') + 1);
    String attribute = metric.equals("tomcat.threads.busy") ? "currentThreadsBusy" : "maxThreads";
    MBeanServer server = ManagementFactory.getPlatformMBeanServer();
    double sum = 0;
    List<String> connectors = new ArrayList<>();
    for (ObjectName name : server.queryNames(new ObjectName("Catalina:type=ThreadPool,name=*"), null)) {
        sum += ((Number) server.getAttribute(name, attribute)).doubleValue();
        // The name is quoted in the ObjectName ("http-nio-127.0.0.1-8080"); Micrometer strips the quotes.
        connectors.add("\"" + name.getKeyProperty("name").replaceAll("^\"|\"$", "") + "\"");
    }
    out.print("{\"name\":\"" + metric + "\",\"description\":null,\"baseUnit\":\"threads\","
            + "\"measurements\":[{\"statistic\":\"VALUE\",\"value\":" + sum + "}],"
            + "\"availableTags\":[{\"tag\":\"name\",\"values\":" + connectors + "}]}");
%>
