//! The Kubernetes RuntimeClass that sends pods to rund: handler `rund`, and the memory each
//! sandbox takes beyond its containers' requests (`guest.memory_overhead_mib`: the guest kernel
//! and the agent) as the pod overhead, so that the scheduler and the kubelet count it.

use crate::admin::HANDLER;
use crate::config::Config;

/// The RuntimeClass manifest (`kubectl apply -f -`).
pub fn manifest(config: &Config) -> String {
    format!(
        "\
apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata:
  name: {HANDLER}
handler: {HANDLER}
overhead:
  podFixed:
    memory: \"{overhead}Mi\"
",
        overhead = config.guest.memory_overhead_mib
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_follows_the_config() {
        let mut config = Config::default();
        let text = manifest(&config);
        assert!(text.contains("handler: rund\n"), "{text}");
        assert!(text.contains("  name: rund\n"), "{text}");
        assert!(
            text.contains(&format!(
                "memory: \"{}Mi\"",
                config.guest.memory_overhead_mib
            )),
            "{text}"
        );
        config.guest.memory_overhead_mib = 100;
        assert!(manifest(&config).contains("    memory: \"100Mi\"\n"));
    }
}
