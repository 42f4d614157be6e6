// SCRAM user for deploy/local/kafka.sh up --brokers 3: creates or updates one SCRAM-SHA-512
// credential through the Admin API (idempotent; format's --add-scram only works on empty storage).
// java -cp 'libs/*' Scram.java HOST:PORT USER PASSWORD_FILE
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.ScramCredentialInfo;
import org.apache.kafka.clients.admin.ScramMechanism;
import org.apache.kafka.clients.admin.UserScramCredentialUpsertion;

public class Scram {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        String password = Files.readString(Path.of(args[2])).trim();
        try (Admin admin = Admin.create(props)) {
            ScramCredentialInfo info = new ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192);
            admin.alterUserScramCredentials(List.of(new UserScramCredentialUpsertion(args[1], info, password)))
                .all().get(60, TimeUnit.SECONDS);
        }
    }
}
