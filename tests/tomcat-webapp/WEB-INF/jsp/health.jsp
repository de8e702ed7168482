<%-- /actuator/health: Spring Boot Actuator's answer for a healthy app. --%><%@ page
 contentType="application/json" session="false" trimDirectiveWhitespaces="true"
%>{"status":"UP"}
