// Readiness probe for deploy/local/kafka.sh: a real Kafka request (DescribeCluster through the
// Admin client) against the broker. Exit 0 when the broker answers with at least one node.
// Run with the broker's own jars on the classpath: java -cp 'libs/*' Probe.java HOST:PORT
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;

public class Probe {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "3000");
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "5000");
        try (Admin admin = Admin.create(props)) {
            int nodes = admin.describeCluster().nodes().get(5, TimeUnit.SECONDS).size();
            if (nodes < 1) {
                System.exit(1);
            }
            System.out.println("nodes=" + nodes);
        }
    }
}
