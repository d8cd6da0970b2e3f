#!/bin/sh
# a stand-in for tomcat's catalina.sh
echo "catalina: starting $CATALINA_HOME"
