//! The parser's rules, the error texts it promises, and the host's build → JSON → parse trip.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::*;

fn parse_ok(text: &str) -> (Config, Vec<String>) {
    parse(text, Path::new("/config/config.json")).unwrap()
}

fn parse_err(text: &str) -> String {
    parse(text, Path::new("/config/config.json"))
        .unwrap_err()
        .to_string()
}

#[test]
fn full_valid_config() {
    let (config, warnings) = parse_ok(
        r#"{
            "entrypoint": ["/docker-entrypoint.sh"],
            "cmd": ["nginx", "-g", "daemon off;"],
            "workdir": "/srv",
            "env": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            "network_enabled": true,
            "guest_ip": "10.100.0.2",
            "guest_cidr": 16,
            "guest_gw": "10.100.0.1",
            "guest_dns": "1.1.1.1, 8.8.8.8",
            "guest_mac": "52:54:00:AB:cd:01",
            "guest_mtu": 1400,
            "volume_mounts": [
                {"device": "/dev/vdd", "path": "/data", "mode": "rw"},
                {"device": "/dev/vde", "path": "/cache", "mode": "overlay", "overlay_device": "/dev/vdf"}
            ],
            "init_mode": "exec",
            "user": "www-data",
            "hostname": "web-1",
            "shutdown_grace_ms": 2500,
            "debug_shell": true
        }"#,
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(
        config.argv(),
        ["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"]
    );
    assert_eq!(config.workdir, Some(PathBuf::from("/srv")));
    assert_eq!(config.env["LANG"], "C.UTF-8");
    let network = config.network.unwrap();
    assert_eq!(network.ip, Ipv4Addr::new(10, 100, 0, 2));
    assert_eq!(network.prefix_len, 16);
    assert_eq!(network.gateway, Some(Ipv4Addr::new(10, 100, 0, 1)));
    assert_eq!(network.dns.len(), 2);
    assert_eq!(
        network.mac,
        Some(MacAddress([0x52, 0x54, 0x00, 0xab, 0xcd, 0x01]))
    );
    assert_eq!(network.mtu, Some(1400));
    assert_eq!(config.volume_mounts.len(), 2);
    assert_eq!(config.volume_mounts[1].mode, VolumeMode::Overlay);
    assert_eq!(
        config.volume_mounts[1].overlay_device,
        Some(PathBuf::from("/dev/vdf"))
    );
    assert_eq!(config.init_mode, Some(InitMode::Exec));
    assert_eq!(config.user.as_deref(), Some("www-data"));
    assert_eq!(config.hostname.as_deref(), Some("web-1"));
    assert_eq!(config.shutdown_grace, Duration::from_millis(2500));
    assert!(config.debug_shell);
}

#[test]
fn go_style_nulls_and_empty_strings_mean_unset() {
    let (config, warnings) = parse_ok(
        r#"{"entrypoint": null, "cmd": ["sh"], "workdir": "", "env": null,
            "network_enabled": false, "guest_ip": "", "guest_gw": "", "guest_dns": "",
            "volume_mounts": null, "init_mode": "", "user": ""}"#,
    );
    assert!(warnings.is_empty());
    assert_eq!(config.argv(), ["sh"]);
    assert_eq!(config.workdir, None);
    assert_eq!(config.network, None);
    assert_eq!(config.init_mode, None);
    assert_eq!(config.user, None);
    assert_eq!(config.shutdown_grace, Duration::from_millis(10_000));
}

#[test]
fn env_as_oci_array() {
    let (config, _) = parse_ok(r#"{"env": ["A=1", "B=x=y"]}"#);
    assert_eq!(config.env["A"], "1");
    assert_eq!(config.env["B"], "x=y");
}

#[test]
fn unknown_keys_warn() {
    let (config, warnings) = parse_ok(r#"{"cmd": ["true"], "colour": "blue", "zz": 1}"#);
    assert_eq!(config.cmd, ["true"]);
    assert_eq!(
        warnings,
        [
            "unknown config key `colour` ignored",
            "unknown config key `zz` ignored"
        ]
    );
}

#[test]
fn systemd_is_detected_from_the_command() {
    for command in SYSTEMD_COMMANDS {
        let (config, _) = parse_ok(&format!(r#"{{"cmd": ["{command}"]}}"#));
        assert_eq!(config.effective_init_mode(), InitMode::Systemd);
    }
    let (config, _) = parse_ok(r#"{"cmd": ["/sbin/init"], "init_mode": "exec"}"#);
    assert_eq!(config.effective_init_mode(), InitMode::Exec);
    let (config, _) = parse_ok(r#"{"cmd": ["nginx"]}"#);
    assert_eq!(config.effective_init_mode(), InitMode::Exec);
}

#[test]
fn each_invalid_value_is_named() {
    let cases: &[(&str, &str)] = &[
        (
            r#"{"cmd": "ls -l"}"#,
            "config key `cmd` has invalid value \"ls -l\": expected an array of strings",
        ),
        (
            r#"{"entrypoint": [1]}"#,
            "config key `entrypoint` has invalid value [1]: expected an array of strings",
        ),
        (
            r#"{"workdir": "srv"}"#,
            "config key `workdir` has invalid value \"srv\": expected an absolute path",
        ),
        (
            r#"{"env": {"A": 1}}"#,
            "config key `env.A` has invalid value 1: expected a string",
        ),
        (
            r#"{"env": ["A"]}"#,
            "config key `env[0]` has invalid value \"A\": expected a \"NAME=value\" string",
        ),
        (r#"{"env": 3}"#, "config key `env` has invalid value 3"),
        (
            r#"{"network_enabled": "yes"}"#,
            "config key `network_enabled` has invalid value \"yes\": expected true or false",
        ),
        (
            r#"{"guest_ip": "10.0.0.300"}"#,
            "config key `guest_ip` has invalid value \"10.0.0.300\": expected an IPv4 address",
        ),
        (
            r#"{"guest_cidr": 33}"#,
            "config key `guest_cidr` has invalid value 33: expected a prefix length, an integer from 0 to 32",
        ),
        (
            r#"{"guest_cidr": "24"}"#,
            "config key `guest_cidr` has invalid value \"24\"",
        ),
        (
            r#"{"guest_gw": "gateway"}"#,
            "config key `guest_gw` has invalid value \"gateway\"",
        ),
        (
            r#"{"guest_dns": "1.1.1"}"#,
            "config key `guest_dns` has invalid value \"1.1.1\"",
        ),
        (
            r#"{"guest_mac": "52:54:00:12:34"}"#,
            "config key `guest_mac` has invalid value \"52:54:00:12:34\": expected a MAC address like 52:54:00:12:34:56",
        ),
        (
            r#"{"guest_mac": "52:54:00:12:34:5g"}"#,
            "config key `guest_mac` has invalid value \"52:54:00:12:34:5g\"",
        ),
        (
            r#"{"guest_mtu": 67}"#,
            "config key `guest_mtu` has invalid value 67: expected an MTU, an integer from 68 to 65535",
        ),
        (
            r#"{"guest_mtu": 65536}"#,
            "config key `guest_mtu` has invalid value 65536",
        ),
        (
            r#"{"guest_mtu": "1500"}"#,
            "config key `guest_mtu` has invalid value \"1500\"",
        ),
        (
            r#"{"network_enabled": true}"#,
            "config key `guest_ip` has invalid value null: expected an IPv4 address when network_enabled is true",
        ),
        (
            r#"{"volume_mounts": {}}"#,
            "config key `volume_mounts` has invalid value {}: expected an array of objects",
        ),
        (
            r#"{"volume_mounts": [{"device": "/dev/vdd", "path": "/d", "mode": "rx"}]}"#,
            "config key `volume_mounts[0].mode` has invalid value \"rx\": expected \"ro\", \"rw\" or \"overlay\"",
        ),
        (
            r#"{"volume_mounts": [{"device": "vdd", "path": "/d"}]}"#,
            "config key `volume_mounts[0].device` has invalid value \"vdd\": expected a device path under /dev/",
        ),
        (
            r#"{"volume_mounts": [{"device": "/dev/vdd", "path": "d"}]}"#,
            "config key `volume_mounts[0].path` has invalid value \"d\": expected an absolute path",
        ),
        (
            r#"{"volume_mounts": [{"device": "/dev/vdd", "path": "/d", "mode": "overlay"}]}"#,
            "config key `volume_mounts[0].overlay_device` has invalid value null",
        ),
        (
            r#"{"init_mode": "sysv"}"#,
            "config key `init_mode` has invalid value \"sysv\": expected \"exec\" or \"systemd\"",
        ),
        (
            r#"{"user": 1000}"#,
            "config key `user` has invalid value 1000: expected a string",
        ),
        (
            r#"{"hostname": "web_1"}"#,
            "config key `hostname` has invalid value \"web_1\"",
        ),
        (
            r#"{"shutdown_grace_ms": -1}"#,
            "config key `shutdown_grace_ms` has invalid value -1: expected milliseconds",
        ),
        (
            r#"{"shutdown_grace_ms": 3600001}"#,
            "config key `shutdown_grace_ms` has invalid value 3600001",
        ),
        (
            r#"{"debug_shell": "on"}"#,
            "config key `debug_shell` has invalid value \"on\": expected true or false",
        ),
    ];
    for (text, expected) in cases {
        let message = parse_err(text);
        assert!(
            message.starts_with(expected),
            "for {text}\n got: {message}\nwant: {expected}"
        );
    }
}

#[test]
fn syntax_and_shape_errors_name_the_file() {
    assert!(parse_err("{").starts_with("/config/config.json is not valid JSON"));
    assert_eq!(
        parse_err("[]"),
        "/config/config.json: the top level must be a JSON object, found an array"
    );
}

#[test]
fn gpu_requested() {
    assert!(parse_ok(r#"{"gpu": {"vendor": "nvidia"}}"#).0.gpu);
    assert!(!parse_ok(r#"{"gpu": null}"#).0.gpu);
    assert!(!parse_ok(r#"{"gpu": false}"#).0.gpu);
}

fn every_key_set() -> Config {
    Config::exec(["/docker-entrypoint.sh"])
        .with_cmd(["nginx", "-g", "daemon off;"])
        .with_workdir("/srv")
        .with_env("LANG", "C.UTF-8")
        .with_env("PATH", "/usr/bin:/bin")
        .with_network(
            Network::new(Ipv4Addr::new(10, 100, 0, 2), 16)
                .with_gateway(Ipv4Addr::new(10, 100, 0, 1))
                .with_dns(Ipv4Addr::new(1, 1, 1, 1))
                .with_dns(Ipv4Addr::new(8, 8, 8, 8))
                .with_mac(MacAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]))
                .with_mtu(9000),
        )
        .with_volume(VolumeMount::read_write("/dev/vdd", "/data"))
        .with_volume(VolumeMount::read_only("/dev/vde", "/srv/static"))
        .with_volume(VolumeMount::overlay("/dev/vdf", "/cache", "/dev/vdg"))
        .with_user("www-data:www-data")
        .with_hostname("web-1")
        .with_shutdown_grace(Duration::from_millis(2500))
        .with_debug_shell(true)
        .with_gpu(true)
}

#[test]
fn built_config_round_trips_through_json() {
    for config in [
        Config::default(),
        Config::exec(["/bin/app"]),
        Config::systemd(),
        Config::exec(["/sbin/init"]).with_cmd(["--log-level=debug"]),
        every_key_set(),
    ] {
        let json = config.to_json().unwrap();
        let (parsed, warnings) = Config::from_json(&json).unwrap();
        assert!(warnings.is_empty(), "{warnings:?} in {json}");
        assert_eq!(parsed, config, "{json}");
        // serde goes through the same form.
        let via_serde: Config = serde_json::from_str(&serde_json::to_string(&config).unwrap())
            .expect("serde round trip");
        assert_eq!(via_serde, config);
    }
}

#[test]
fn written_json_uses_every_key_guest_init_reads() {
    let Value::Object(map) = every_key_set().to_value() else {
        panic!("not an object")
    };
    let mut written: Vec<&str> = map.keys().map(String::as_str).collect();
    let mut known = key::ALL.to_vec();
    written.sort();
    known.sort();
    assert_eq!(written, known);
    assert_eq!(
        map[key::GUEST_DNS],
        serde_json::json!(["1.1.1.1", "8.8.8.8"])
    );
    assert_eq!(map[key::GUEST_MAC], "52:54:00:12:34:56");
    assert_eq!(map[key::GUEST_MTU], 9000);
    assert_eq!(
        map[key::VOLUME_MOUNTS][2],
        serde_json::json!({"device": "/dev/vdf", "path": "/cache", "mode": "overlay",
                           "overlay_device": "/dev/vdg"})
    );
}

#[test]
fn exec_builder_pins_the_mode() {
    let config = Config::exec(["/sbin/init"]);
    assert_eq!(config.effective_init_mode(), InitMode::Exec);
    assert_eq!(config.argv(), ["/sbin/init"]);
    assert!(
        Config::exec(["/bin/app"])
            .to_json()
            .unwrap()
            .contains("\"init_mode\": \"exec\"")
    );
    assert_eq!(Config::systemd().effective_init_mode(), InitMode::Systemd);
}

#[test]
fn building_an_invalid_config_fails_with_guest_init_s_message() {
    let err = Config::exec(["/bin/app"])
        .with_hostname("web_1")
        .to_json()
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("config key `hostname` has invalid value \"web_1\""),
        "{err}"
    );
    let err = Config::exec(["/bin/app"])
        .with_workdir("srv")
        .to_json()
        .unwrap_err();
    assert!(
        err.to_string().contains("expected an absolute path"),
        "{err}"
    );
    let err = Config::exec(["/bin/app"])
        .with_shutdown_grace(Duration::from_secs(7200))
        .to_json()
        .unwrap_err();
    assert!(err.to_string().contains("`shutdown_grace_ms`"), "{err}");
    let err = serde_json::from_str::<Config>(r#"{"guest_cidr": 40}"#).unwrap_err();
    assert!(err.to_string().contains("`guest_cidr`"), "{err}");
}

#[test]
fn mac_addresses_read_and_print_in_lower_case() {
    let mac: MacAddress = "52:54:00:AB:cd:0F".parse().unwrap();
    assert_eq!(mac, MacAddress([0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]));
    assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
    for bad in [
        "",
        "52:54:00:ab:cd",
        "52:54:00:ab:cd:0f:00",
        "52-54-00-ab-cd-0f",
        "5:54:00:ab:cd:0f",
        "+2:54:00:ab:cd:0f",
    ] {
        assert!(bad.parse::<MacAddress>().is_err(), "{bad:?}");
    }
}

#[test]
fn the_subnet_decides_whether_a_gateway_is_on_link() {
    let network = Network::new(Ipv4Addr::new(192, 0, 2, 15), 25);
    assert_eq!(network.subnet(), Ipv4Addr::new(192, 0, 2, 0));
    assert!(network.contains(Ipv4Addr::new(192, 0, 2, 2)));
    assert!(!network.contains(Ipv4Addr::new(192, 0, 2, 200)));
    assert!(!network.contains(Ipv4Addr::new(10, 0, 0, 1)));
    let everything = Network::new(Ipv4Addr::new(10, 1, 2, 3), 0);
    assert_eq!(everything.subnet(), Ipv4Addr::UNSPECIFIED);
    assert!(everything.contains(Ipv4Addr::new(8, 8, 8, 8)));
    let host = Network::new(Ipv4Addr::new(10, 1, 2, 3), 32);
    assert_eq!(host.subnet(), Ipv4Addr::new(10, 1, 2, 3));
    assert!(!host.contains(Ipv4Addr::new(10, 1, 2, 4)));
}
